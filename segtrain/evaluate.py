"""`segtrain eval`: a checkpoint on its run's validation data."""

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
from segtrain.metrics.report import report
from segtrain.train import build_task, loader_options
from segtrain.utils.checkpoint import check_config_targets, load_checkpoint, load_model_state
from segtrain.utils.distributed import is_main_process, join_launched_group

log = logging.getLogger("segtrain.eval")

# Keys of eval.yaml itself; every other command-line override edits the checkpoint's config.
EVAL_KEYS = {"ckpt", "output", "use_ema"}


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
    join_launched_group()
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
    loader = build_eval_loader(val_set, run_cfg.data.val_batch_size, task.collate,
                               loader_options(run_cfg, device))
    output = Path(cfg.output) if cfg.output else Path(HydraConfig.get().runtime.output_dir)
    metrics_path = output if output.suffix == ".json" else output / "metrics.json"
    # Under torchrun each rank evaluates its share of the data; every rank gets the output
    # directory (per-image files are written by their rank, whole-set files by rank 0).
    metrics, _ = evaluate_model(
        model, task, loader, task.build_evaluator(metrics_path.parent), device,
        run_cfg.trainer.precision, progress=None if is_main_process() else False,
    )
    if is_main_process():  # every rank holds the same reduced metrics
        report(metrics, metrics_path)
    return metrics
