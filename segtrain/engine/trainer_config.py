"""The training loop's settings (the `trainer` config group), its checkpointed state, and the
two lookups the loop and the commands share: the device and a metric by path."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch

from segtrain.utils.distributed import is_distributed


@dataclass
class TrainerConfig:
    """The `trainer` config group (see conf/trainer/default.yaml for each key's meaning)."""

    max_iters: int | None = 600
    max_epochs: int | None = None
    eval_every: int = 200
    ckpt_every: int = 200
    precision: str = "fp32"
    device: str = "auto"
    grad_accum: int = 1
    clip_grad_norm: float | None = None
    channels_last: bool = False
    log_every: int = 20
    keep_last: int = 2
    best_metric: str | None = "auto"  # auto: the task's primary_metric
    best_mode: str = "max"
    deterministic: bool = False
    ema: float | None = None
    compile: bool = False
    skip_nonfinite: bool = False
    skip_nonfinite_limit: int = 10  # consecutive skipped steps that stop the run anyway
    vis_images: int = 4
    sync_bn: bool = False
    find_unused_parameters: bool = False
    precise_bn_batches: int = 0  # training batches that recompute BatchNorm stats before eval
    bn_check: bool = True  # warn when batch statistics score a val batch much better

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainerConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise KeyError(f"unknown trainer keys {unknown}; valid keys: {sorted(known)}")
        cfg = cls(**values)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"trainer.precision={self.precision!r}; expected fp32, bf16 or fp16")
        if self.max_iters is None and self.max_epochs is None:
            raise ValueError("set trainer.max_iters or trainer.max_epochs")
        if self.grad_accum < 1:
            raise ValueError(f"trainer.grad_accum={self.grad_accum}; expected an integer >= 1")
        if self.best_mode not in ("max", "min"):
            raise ValueError(f"trainer.best_mode={self.best_mode!r}; expected max or min")
        if self.ema is not None and not 0.0 < self.ema < 1.0:
            raise ValueError(f"trainer.ema={self.ema}; expected a decay in (0, 1) or null")
        if isinstance(self.precise_bn_batches, bool) or not (
            isinstance(self.precise_bn_batches, int) and self.precise_bn_batches >= 0
        ):
            raise ValueError(f"trainer.precise_bn_batches={self.precise_bn_batches!r}; expected "
                             "an integer >= 0 (0 = off; detectron2 uses 200)")
        for key in ("sync_bn", "find_unused_parameters", "bn_check"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"trainer.{key}={getattr(self, key)!r}; expected true or false")


@dataclass
class TrainState:
    """Where the run is; saved in every checkpoint so that resume continues exactly."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    best_value: float | None = None
    best_step: int | None = None
    skipped_steps: int = 0
    last_metrics: dict = field(default_factory=dict)
    world_size: int = 1  # ranks that trained: batch_in_epoch counts batches of one rank's share


def resolve_device(spec: str) -> torch.device:
    """'auto' picks CUDA when present; asking for CUDA without one is an error, not a fallback."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"trainer.device={spec} but no CUDA device is available; use auto or cpu")
    if device.type == "cuda" and device.index is None and is_distributed():
        # Under torchrun each rank has set its own GPU (cuda:LOCAL_RANK); DDP needs the index.
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def lookup_metric(metrics: dict, path: str) -> float:
    """Value at 'family/key' (e.g. 'semantic/mIoU') in a nested metrics dict."""
    node: Any = metrics
    for part in path.split("/"):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(
                f"trainer.best_metric={path!r} is not among the evaluation's metrics "
                f"(top level: {sorted(metrics)}); use e.g. semantic/mIoU"
            )
        node = node[part]
    return float(node)
