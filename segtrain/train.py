"""`segtrain train`: build every part from the composed config, run the Trainer, report metrics."""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path

import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from segtrain.builders import (
    build_data,
    build_task,
    check_loss_applies,
    check_sampler_config,
    check_task_fits_data,
    loader_options,
    resolve_class_weights,
    resolve_task_mode,
    train_repeat_factors,
)
from segtrain.config_check import check_class_counts, check_config
from segtrain.config_trust import check_stored_config
from segtrain.data.loader import build_eval_loader, build_train_loader
from segtrain.engine.run_dir import claim_run_dir
from segtrain.engine.run_dir import resolve_resume as resolve_resume  # re-exported: its old home
from segtrain.engine.trainer import Trainer, TrainerConfig, lookup_metric, resolve_device
from segtrain.metrics.report import report
from segtrain.optim import build_param_groups
from segtrain.utils.checkpoint import load_checkpoint
from segtrain.utils.distributed import get_world_size, is_main_process, join_launched_group

log = logging.getLogger("segtrain.train")


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed Python, NumPy and torch; optionally ask for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def build_optimizer(opt_cfg: DictConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """Instantiate the optimizer config over parameter groups (backbone lr, no decay on norms)."""
    opt_cfg = opt_cfg.copy()
    OmegaConf.set_struct(opt_cfg, False)
    with_groups = {
        key: opt_cfg.pop(key) for key in ("backbone_lr_mult", "norm_weight_decay", "bias_weight_decay")
        if key in opt_cfg
    }
    groups = build_param_groups(
        model, lr=opt_cfg.lr, weight_decay=opt_cfg.get("weight_decay", 0.0), **with_groups
    )
    return instantiate(opt_cfg)(groups)


def train(cfg: DictConfig) -> float | None:
    """Train as configured; returns the objective (the best metric) for Hydra sweepers."""
    join_launched_group()
    check_config(cfg)
    check_sampler_config(cfg)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    trainer_cfg = TrainerConfig.from_dict(OmegaConf.to_container(cfg.trainer, resolve=True))
    # A single run's directory was claimed (locked, checked) by the RunDirGuard callback before
    # Hydra wrote to it; a sweep job's, or a direct call's, is claimed here.
    claim = claim_run_dir(run_dir, training=True, resume=cfg.resume)
    claim.log_notes()
    resume_from = claim.resume_from
    with open_dict(cfg):  # this command's own decision: never written into a checkpoint
        trust = cfg.pop("trust", None)
    resume_state = load_checkpoint(resume_from) if resume_from else None
    if resume_state is not None:  # nothing is built from it, but it must pass what eval checks
        check_stored_config(resume_state["config"], trust, f"checkpoint {resume_from}")
    seed_everything(cfg.seed, trainer_cfg.deterministic)
    device = resolve_device(trainer_cfg.device)

    train_set, val_set = build_data(cfg)
    check_class_counts(cfg)  # counts left null are known now
    resolve_task_mode(cfg, train_set)
    resolve_class_weights(cfg, train_set)
    meta = train_set.meta
    check_loss_applies(cfg)
    task = build_task(cfg, meta)
    check_task_fits_data(task, cfg, {"train": train_set, "val": val_set})
    model = instantiate(cfg.model)
    optimizer = build_optimizer(cfg.optimizer, model)
    options = loader_options(cfg, device)
    train_loader = build_train_loader(train_set, cfg.data.batch_size, task.collate, cfg.seed, options,
                                      repeat_factors=train_repeat_factors(cfg, train_set))
    val_loader = None
    if val_set is not None:
        val_loader = build_eval_loader(val_set, cfg.data.val_batch_size, task.collate, options)
    trainer = Trainer(
        model, task, optimizer, instantiate(cfg.scheduler), train_loader, val_loader, trainer_cfg,
        run_dir, checkpoint_extra={"config": OmegaConf.to_yaml(cfg), "meta": meta.to_dict()},
    )
    if resume_state is not None:
        trainer.load_state_dict(resume_state)
        log.info("resumed from %s at iteration %d", resume_from, trainer.state.step)
    log.info("run directory: %s (%d iterations, device %s)", run_dir, trainer.total_iters, device)
    if get_world_size() > 1:
        log.info("distributed data parallel: %d ranks, global batch %d", get_world_size(),
                 get_world_size() * cfg.data.batch_size * trainer.cfg.grad_accum)

    metrics = trainer.fit()
    if not is_main_process():
        return None
    if metrics:
        report(metrics, run_dir / "metrics.json")
    if trainer.cfg.best_metric and metrics:
        return trainer.state.best_value if trainer.state.best_value is not None else lookup_metric(
            metrics, trainer.cfg.best_metric
        )
    return None
