"""The training loop's settings (the `trainer` config group), its checkpointed state, and the
two lookups the loop and the commands share: the device and a metric by path."""

from __future__ import annotations

import re
import typing
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, Literal

import torch

from segtrain.config_check import ConfigValueError, check_types
from segtrain.utils.distributed import is_distributed


@dataclass
class TrainerConfig:
    """The `trainer` config group (see conf/trainer/default.yaml for each key's meaning)."""

    max_iters: int | None = 600
    max_epochs: int | None = None
    eval_every: int = 200
    ckpt_every: int = 200
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    device: str = "auto"
    grad_accum: int = 1
    clip_grad_norm: float | None = None
    channels_last: bool = False
    log_every: int = 20
    keep_last: int = 2
    best_metric: str | None = "auto"  # auto: the task's primary_metric
    best_mode: Literal["max", "min"] = "max"
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
        """ConfigValueError naming the key for a value of the wrong type (the field annotations)
        or outside its range (`RANGES`)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        check_types(values, typing.get_type_hints(TrainerConfig), "trainer")
        for key, ok, expected in RANGES:
            if values[key] is not None and not ok(values[key]):
                raise ConfigValueError(f"trainer.{key}={values[key]!r}: expected {expected}")
        if self.max_iters is None and self.max_epochs is None:
            raise ConfigValueError("set trainer.max_iters or trainer.max_epochs")


_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
# (key, check, what is expected): what the types alone do not say; null passes where typed so.
RANGES: list[tuple[str, Callable[[Any], bool], str]] = [
    ("max_iters", lambda v: v >= 1, "an integer >= 1 or null"),
    ("max_epochs", lambda v: v >= 1, "an integer >= 1 or null"),
    ("eval_every", lambda v: v >= 0, "an integer >= 0 (0 = only at the end)"),
    ("ckpt_every", lambda v: v >= 0, "an integer >= 0 (0 = only at the end)"),
    ("log_every", lambda v: v >= 0, "an integer >= 0"),
    ("keep_last", lambda v: v >= 0, "an integer >= 0"),
    ("grad_accum", lambda v: v >= 1, "an integer >= 1"),
    ("clip_grad_norm", lambda v: v > 0, "a number > 0 or null"),
    ("vis_images", lambda v: v >= 0, "an integer >= 0"),
    ("skip_nonfinite_limit", lambda v: v >= 1, "an integer >= 1"),
    ("device", lambda v: bool(_DEVICE.match(v)), "auto, cpu, cuda or cuda:N"),
    ("ema", lambda v: 0.0 < v < 1.0, "a decay in (0, 1) or null"),
    ("precise_bn_batches", lambda v: v >= 0, "an integer >= 0 (0 = off; detectron2 uses 200)"),
]


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
