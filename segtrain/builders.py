"""Building a run's parts from the composed config: the data, the model family's adapter (task),
the loader options, and the checks that they fit. Shared by train, eval, predict and data."""

from __future__ import annotations

import inspect
import json
import logging
import re
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from segtrain.config_check import ConfigValueError
from segtrain.data.loader import LoaderOptions
from segtrain.data.samplers import (
    SAMPLERS,
    RepeatFactorSampler,
    dataset_image_categories,
    describe_repeat_factors,
    repeat_factors,
)
from segtrain.metrics.build import evaluator_target_keys

log = logging.getLogger("segtrain.builders")


def build_data(cfg: DictConfig) -> tuple[Any, Any]:
    """Instantiate the train and val datasets of `cfg.dataset`.

    A dataset config may leave `num_classes` (and a panoptic one `num_things` / `num_stuff`)
    null when the data defines it (a COCO JSON's categories): it is filled in from the train
    set's metadata, so the model and the checkpoint get it.
    """
    train_set = instantiate(cfg.dataset.train)
    fill_class_counts(cfg, train_set.meta)
    val_set = instantiate(cfg.dataset.val) if cfg.dataset.get("val") is not None else None
    return train_set, val_set


def fill_class_counts(cfg: DictConfig, meta: Any) -> None:
    """Set `dataset.num_classes` / `num_things` / `num_stuff` left null from the train metadata."""
    counts = {"num_classes": len(meta.classes), "num_things": len(meta.thing_ids),
              "num_stuff": len(meta.stuff_ids)}
    with open_dict(cfg):
        for key, value in counts.items():
            if key in cfg.dataset and cfg.dataset[key] is None:
                cfg.dataset[key] = value


def resolve_class_weights(cfg: DictConfig, dataset: Any) -> None:
    """`class_weights: auto | median_frequency | inverse` anywhere in `cfg.loss` becomes the list
    of weights computed from `dataset`'s pixel shares (segtrain.losses.class_weights), logged,
    and stored so: the run's checkpoint holds the numbers, eval never recounts."""
    if cfg.get("loss") is None:
        return
    nodes = [node for node in _config_nodes(cfg.loss) if isinstance(node.get("class_weights"), str)]
    if not nodes:
        return
    from segtrain.losses.class_weights import balanced_weights, class_pixel_counts

    meta = dataset.meta
    train_cfg = OmegaConf.to_container(cfg.dataset.train, resolve=True)
    train_cfg.pop("transforms", None)  # augmentation does not change what the data holds
    data_key = json.dumps(train_cfg, sort_keys=True, default=str)
    log.info("class_weights: counting the training set's pixels per class (cached after this run)")
    counts = class_pixel_counts(dataset, meta.num_classes, meta.ignore_index, data_key)
    for node in nodes:
        mode = str(node.class_weights)
        weights = balanced_weights(counts, mode)
        shares = counts.double() / max(int(counts.sum()), 1)
        log.info("class_weights=%s: %s", mode, ", ".join(
            f"{name} {float(w):.3g} ({100 * float(p):.2f}% of pixels)"
            for name, w, p in zip(meta.classes, weights, shares)))
        with open_dict(node):
            node.class_weights = [round(float(w), 6) for w in weights]


def _config_nodes(node: Any) -> list[DictConfig]:
    """`node` and every DictConfig nested in it (a combined loss's terms)."""
    if not isinstance(node, DictConfig):
        return []
    found = [node]
    for key in node:
        found += _config_nodes(node.get(key))
    return found


def resolve_task_mode(cfg: DictConfig, dataset: Any) -> None:
    """`task.mode: auto` (a family that learns whatever the data annotates: Mask2Former) becomes
    the mode of the dataset's first item (its target keys; read under a forked RNG), so the run's
    stored config, and every later eval or predict, names it."""
    if OmegaConf.select(cfg, "task.mode") != "auto" or dataset is None or len(dataset) == 0:
        return
    mode_of = getattr(get_object(cfg.task._target_), "mode_of_target", None)
    if mode_of is None:
        return
    with torch.random.fork_rng(devices=[]):
        _, target = dataset[0]
    with open_dict(cfg):
        cfg.task.mode = mode_of(target)


def build_task(cfg: DictConfig, meta: Any, with_loss: bool = True) -> Any:
    """The model family's adapter (`cfg.task`) over the dataset metadata (class names, palette,
    thing/stuff split, category ids), with the evaluators `cfg.evaluators` names (null: the
    family's defaults) and, for a family trained with a configurable loss, `cfg.loss`.
    """
    params = inspect.signature(get_object(cfg.task._target_)).parameters
    kwargs: dict[str, Any] = {"meta": meta}
    if cfg.get("evaluators") is not None:
        kwargs["evaluators"] = [str(name) for name in cfg.evaluators]
    if "loss" in params:
        kwargs["loss"] = instantiate(cfg.loss) if with_loss and cfg.get("loss") is not None else None
    # Through _partial_: instantiate's keyword arguments would be merged into OmegaConf, which
    # cannot hold the DatasetMeta dataclass.
    return instantiate(cfg.task, _partial_=True)(**kwargs)


def check_loss_applies(cfg: DictConfig) -> None:
    """`loss=...` (or `loss.x=...`) on the command line for a model family that computes its own
    losses (Mask R-CNN, Panoptic FPN) is an error, not silently ignored."""
    if "loss" in inspect.signature(get_object(cfg.task._target_)).parameters:
        return
    try:
        overrides = list(HydraConfig.get().overrides.task)
    except ValueError:  # not under Hydra (a direct call): nothing was asked for
        return
    asked = [o for o in overrides if re.match(r"^[+~]*loss([.=@]|$)", o)]
    if asked:
        weights = OmegaConf.select(cfg, "task.loss_weights")
        names = ", ".join(weights) if weights else "its own losses"
        raise ValueError(
            f"{asked[0]}: model={_choice('model', cfg)} computes its own losses ({names}), so the "
            "loss group does not apply to it (it is for semantic models); weight its losses with "
            "task.loss_weights.<name>=... instead"
        )


def check_task_fits_data(task: Any, cfg: DictConfig, splits: dict[str, Any]) -> None:
    """The first item of each split has the annotations the task trains and evaluates on (e.g.
    Mask R-CNN needs boxes, masks and labels); otherwise a clear error before the first step,
    not a KeyError from a loader worker. The item is read under a forked RNG: augmentations
    must not shift the run's random stream."""
    for split, dataset in splits.items():
        need = tuple(getattr(task, "required_targets", ()))
        if split != "train":  # what the evaluators read, too
            need += tuple(k for k in evaluator_target_keys(getattr(task, "evaluators", ())) if k not in need)
        if dataset is None or not need or len(dataset) == 0:
            continue
        with torch.random.fork_rng(devices=[]):
            _, target = dataset[0]
        missing = [key for key in need if key not in target]
        if missing:
            given = ", ".join(sorted(k for k in target if k not in ("image_id", "orig_size", "file_name")))
            raise ValueError(
                f"model={_choice('model', cfg)} trains the {type(task).__name__} task, which (with "
                f"evaluators {list(getattr(task, 'evaluators', []))}) needs targets with "
                f"{', '.join(need)}; dataset={cfg.dataset.get('name', '?')} ({split}) "
                f"gives only {given or 'no annotations'} (missing {', '.join(missing)}). Choose a "
                "dataset with those annotations (e.g. synthetic_instance, coco, coco_panoptic) or a "
                "model for this data (e.g. model=unet)"
            )


def _choice(group: str, cfg: DictConfig) -> str:
    """The option picked for a config group (e.g. 'maskrcnn'), or its `_target_` when unknown."""
    try:
        return str(HydraConfig.get().runtime.choices[group])
    except (ValueError, KeyError):
        return str(OmegaConf.select(cfg, f"{group}._target_"))


def check_sampler_config(cfg: DictConfig) -> None:
    """`data.sampler` is uniform or repeat_factor, and `data.repeat_threshold` a fraction in
    (0, 1]: a ConfigValueError naming the key, before anything is built."""
    sampler = OmegaConf.select(cfg, "data.sampler", default="uniform")
    if sampler not in SAMPLERS:
        raise ConfigValueError(f"data.sampler={sampler!r}: expected one of {', '.join(SAMPLERS)}")
    threshold = OmegaConf.select(cfg, "data.repeat_threshold", default=0.001)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold <= 1:
        raise ConfigValueError(
            f"data.repeat_threshold={threshold!r}: expected a fraction of images in (0, 1] (LVIS uses "
            "0.001): categories in fewer images than that are repeated"
        )


def train_repeat_factors(cfg: DictConfig, dataset: Any) -> torch.Tensor | None:
    """With `data.sampler=repeat_factor`, the training set's repeat factors (float64 (N,)),
    from each image's categories (`dataset_image_categories`), summarised in the log; None for
    the uniform sampler."""
    check_sampler_config(cfg)
    if OmegaConf.select(cfg, "data.sampler", default="uniform") != "repeat_factor":
        return None
    threshold = float(cfg.data.repeat_threshold)
    factors = repeat_factors(dataset_image_categories(dataset), threshold)
    first_epoch = len(RepeatFactorSampler(factors, cfg.seed).epoch_indices(0))
    log.info(describe_repeat_factors(factors, threshold, first_epoch))
    return factors


def loader_options(cfg: DictConfig, device: torch.device) -> LoaderOptions:
    """The `data` group's loader keys; `pin_memory: auto` means on when training on CUDA."""
    pin = device.type == "cuda" if cfg.data.pin_memory == "auto" else bool(cfg.data.pin_memory)
    return LoaderOptions(cfg.data.num_workers, pin, cfg.data.persistent_workers, cfg.data.skip_corrupt)
