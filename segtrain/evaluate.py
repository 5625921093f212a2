"""`segtrain eval` (a checkpoint on its run's validation data) and `segtrain score` (files only)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from segtrain.data.loader import build_eval_loader
from segtrain.data.meta import DatasetMeta
from segtrain.engine.evaluation import evaluate_model
from segtrain.engine.trainer import resolve_device
from segtrain.train import build_task, pin_memory, report
from segtrain.utils.checkpoint import check_config_targets, load_checkpoint, load_model_state

log = logging.getLogger("segtrain.eval")

# Keys of eval.yaml itself; every other command-line override edits the checkpoint's config.
EVAL_KEYS = {"ckpt", "output", "use_ema"}
SCORE_TASKS = ("semantic", "instance", "lvis")


def _command_line_keys() -> list[str]:
    """Config paths the user set on the command line (group choices and values alike)."""
    overrides = OverridesParser.create().parse_overrides(list(HydraConfig.get().overrides.task))
    return [o.key_or_group for o in overrides if not o.is_delete()]


def _raw_value(container: dict, dotted: str) -> Any:
    node: Any = container
    for part in dotted.split("."):
        node = node[part]
    return node


def merge_stored_config(stored: DictConfig, composed: DictConfig, keys: list[str]) -> DictConfig:
    """The checkpoint's config, with the values at `keys` taken from the composed command line.

    Values are copied unresolved, so `${dataset.num_classes}`-style links keep working.
    """
    merged = stored.copy()
    raw = OmegaConf.to_container(composed, resolve=False)
    for key in keys:
        if key.split(".")[0] in EVAL_KEYS or key.startswith("hydra"):
            continue
        OmegaConf.update(merged, key, _raw_value(raw, key), merge=False, force_add=True)
    return merged


def evaluate(cfg: DictConfig) -> dict:
    """Rebuild model and validation data from the checkpoint alone; report and save metrics."""
    ckpt_path = Path(cfg.ckpt)
    ckpt = load_checkpoint(ckpt_path)
    stored = OmegaConf.create(ckpt["config"])
    check_config_targets(OmegaConf.to_container(stored), f"checkpoint {ckpt_path}")
    run_cfg = merge_stored_config(stored, cfg, _command_line_keys())

    val_set = instantiate(run_cfg.dataset.val)
    meta = DatasetMeta.from_dict(ckpt["meta"]) if "meta" in ckpt else val_set.meta
    model = instantiate(run_cfg.model)
    state = ckpt["model"]
    if cfg.use_ema:
        if ckpt.get("ema") is None:
            raise ValueError(f"use_ema=true but {ckpt_path} holds no EMA weights (trainer.ema)")
        state = {k.removeprefix("module."): v for k, v in ckpt["ema"].items() if k != "n_averaged"}
    load_model_state(model, state, f"checkpoint {ckpt_path}")
    device = resolve_device(run_cfg.trainer.device)
    model.to(device)
    task = build_task(run_cfg, meta, with_loss=False)
    loader = build_eval_loader(
        val_set, run_cfg.data.val_batch_size, task.collate, run_cfg.data.num_workers,
        pin_memory(run_cfg, device),
    )
    output = Path(cfg.output) if cfg.output else Path(HydraConfig.get().runtime.output_dir)
    metrics_path = output if output.suffix == ".json" else output / "metrics.json"
    metrics, _ = evaluate_model(
        model, task, loader, task.build_evaluator(metrics_path.parent), device,
        run_cfg.trainer.precision,
    )
    report(metrics, metrics_path)
    return metrics


def score(cfg: DictConfig) -> dict:
    """Score prediction files against ground truth in the dataset's standard format."""
    # `task=` picks an option of the task group (so Hydra lists the valid ones on a typo);
    # the scorer goes by the option's name, not by the training-time task object it holds.
    task = HydraConfig.get().runtime.choices["task"]
    if task not in SCORE_TASKS:
        raise ValueError(f"score task={task!r}; valid tasks: {', '.join(SCORE_TASKS)}")
    if task == "semantic":
        from segtrain.metrics.semantic import score_semantic_dirs

        if cfg.num_classes is None:
            raise ValueError("score task=semantic needs num_classes=N (the number of classes)")
        class_names = list(cfg.class_names) if cfg.class_names is not None else None
        metrics = score_semantic_dirs(
            cfg.gt, cfg.pred, int(cfg.num_classes), int(cfg.ignore_index), class_names
        )
    else:
        from segtrain.metrics.coco import score_coco
        from segtrain.metrics.lvis import score_lvis
        from segtrain.metrics.report import format_ap_table

        # The results file as given: by default its boxes place detections in size ranges, as
        # pycocotools' loadRes (and LVISResults) do; area_from=mask follows detectron2/MMDetection.
        iou_types = cfg.iou_types
        if iou_types is not None:
            iou_types = [iou_types] if isinstance(iou_types, str) else list(iou_types)
        scorer = score_coco if task == "instance" else score_lvis
        metrics = scorer(cfg.gt, cfg.pred, iou_types, area_from=cfg.area_from)
        print(format_ap_table(metrics))
    output = Path(cfg.output) if cfg.output else Path(HydraConfig.get().runtime.output_dir)
    report(metrics, output if output.suffix == ".json" else output / "metrics.json")
    return metrics
