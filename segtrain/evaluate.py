"""`segtrain eval`: a checkpoint on its run's validation data."""

from __future__ import annotations

import logging
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig

from segtrain.config_check import check_config
from segtrain.data.loader import build_eval_loader
from segtrain.data.meta import DatasetMeta
from segtrain.engine.evaluation import evaluate_model
from segtrain.engine.trainer_config import resolve_device
from segtrain.eval_config import build_eval_config
from segtrain.metrics.report import report
from segtrain.train import build_task, loader_options
from segtrain.utils.checkpoint import load_checkpoint, load_model_state
from segtrain.utils.distributed import is_main_process, join_launched_group

log = logging.getLogger("segtrain.eval")


def evaluate(cfg: DictConfig) -> dict:
    """Rebuild model and validation data from the checkpoint alone; report and save metrics."""
    join_launched_group()
    ckpt_path = Path(cfg.ckpt)
    ckpt = load_checkpoint(ckpt_path)
    run_cfg = build_eval_config(ckpt["config"], cfg, HydraConfig.get().overrides.task,
                                f"checkpoint {ckpt_path}")
    check_config(run_cfg)  # after the trust check: this imports the (allowed) targets
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
    log.info("evaluating %s on %d images (device %s)", ckpt_path, len(val_set), device)
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
