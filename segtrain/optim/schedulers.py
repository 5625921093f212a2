"""Per-iteration learning-rate schedules (poly, cosine, multistep) with optional linear warmup."""

from __future__ import annotations

import bisect
import functools
import math
from collections.abc import Callable, Sequence

import torch
from torch.optim.lr_scheduler import LambdaLR


def _check_common(total_iters: int, warmup_iters: int, warmup_factor: float) -> None:
    if total_iters < 1:
        raise ValueError(f"total_iters={total_iters}; expected at least 1 iteration")
    if not 0 <= warmup_iters < total_iters:
        raise ValueError(
            f"warmup_iters={warmup_iters}; expected 0 <= warmup_iters < total_iters={total_iters}"
        )
    if not 0.0 <= warmup_factor <= 1.0:
        raise ValueError(f"warmup_factor={warmup_factor}; expected a value in [0, 1]")


def _check_ratio(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name}={value}; expected a value in [0, 1]")


def _warmed_up(
    step: int, schedule: Callable[[int], float], warmup_iters: int, warmup_factor: float
) -> float:
    """The schedule's factor at `step`, ramped linearly from `warmup_factor` during warmup.

    As detectron2's WarmupParamScheduler: the ramp ends at the schedule's own value at
    `warmup_iters`, so the curve is continuous there.
    """
    if step >= warmup_iters:
        return schedule(step)
    alpha = step / warmup_iters
    return warmup_factor + (schedule(warmup_iters) - warmup_factor) * alpha


def _poly(step: int, total_iters: int, power: float, min_lr_ratio: float) -> float:
    progress = min(step, total_iters) / total_iters
    return min_lr_ratio + (1.0 - min_lr_ratio) * (1.0 - progress) ** power


def _cosine(step: int, total_iters: int, min_lr_ratio: float) -> float:
    progress = min(step, total_iters) / total_iters
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _multistep(step: int, milestones: tuple[int, ...], gamma: float) -> float:
    return gamma ** bisect.bisect_right(milestones, step)


def _lambda_lr(
    optimizer: torch.optim.Optimizer,
    schedule: Callable[[int], float],
    warmup_iters: int,
    warmup_factor: float,
) -> LambdaLR:
    # A partial of module-level functions (not a closure) pickles and deep-copies; LambdaLR
    # stores its empty __dict__, so a resumed run takes its schedule from the config and only
    # `last_epoch` (the step count) from the checkpoint.
    factor = functools.partial(
        _warmed_up, schedule=schedule, warmup_iters=warmup_iters, warmup_factor=warmup_factor
    )
    return LambdaLR(optimizer, factor)


def poly(
    optimizer: torch.optim.Optimizer,
    total_iters: int,
    power: float = 0.9,
    min_lr_ratio: float = 0.0,
    warmup_iters: int = 0,
    warmup_factor: float = 0.001,
) -> LambdaLR:
    """lr = base * (min_lr_ratio + (1 - min_lr_ratio) * (1 - step / total_iters) ** power).

    Stepped once per iteration; reaches `min_lr_ratio * base` at `total_iters`.
    """
    _check_common(total_iters, warmup_iters, warmup_factor)
    _check_ratio("min_lr_ratio", min_lr_ratio)
    if power < 0:
        raise ValueError(f"power={power}; expected >= 0")
    schedule = functools.partial(
        _poly, total_iters=total_iters, power=float(power), min_lr_ratio=float(min_lr_ratio)
    )
    return _lambda_lr(optimizer, schedule, warmup_iters, warmup_factor)


def cosine(
    optimizer: torch.optim.Optimizer,
    total_iters: int,
    min_lr_ratio: float = 0.0,
    warmup_iters: int = 0,
    warmup_factor: float = 0.001,
) -> LambdaLR:
    """lr = base * (min_lr_ratio + (1 - min_lr_ratio) * (1 + cos(pi * step / total_iters)) / 2)."""
    _check_common(total_iters, warmup_iters, warmup_factor)
    _check_ratio("min_lr_ratio", min_lr_ratio)
    schedule = functools.partial(
        _cosine, total_iters=total_iters, min_lr_ratio=float(min_lr_ratio)
    )
    return _lambda_lr(optimizer, schedule, warmup_iters, warmup_factor)


def milestone_iters(milestones: Sequence[float | int], total_iters: int) -> tuple[int, ...]:
    """Milestones as iterations: an int is an iteration, a float in (0, 1) a fraction of
    `total_iters` (rounded, at least 1). They must increase strictly and lie in [1, total_iters].
    """
    positions = []
    for m in milestones:
        if isinstance(m, bool) or not isinstance(m, (int, float)):
            raise ValueError(f"milestone {m!r}: expected an int iteration or a float in (0, 1)")
        if isinstance(m, float) and not 0.0 < m < 1.0:
            raise ValueError(
                f"milestone {m}: a float milestone is a fraction of total_iters and must lie "
                "in (0, 1); write an iteration as an int"
            )
        if isinstance(m, int) and not 1 <= m <= total_iters:
            raise ValueError(f"milestone {m}: expected an iteration in [1, {total_iters}]")
        positions.append(m * total_iters if isinstance(m, float) else m)
    if any(b <= a for a, b in zip(positions, positions[1:])):
        raise ValueError(f"milestones={list(milestones)} must be strictly increasing")
    return tuple(max(1, round(p)) for p in positions)


def multistep(
    optimizer: torch.optim.Optimizer,
    total_iters: int,
    milestones: Sequence[float | int],
    gamma: float = 0.1,
    warmup_iters: int = 0,
    warmup_factor: float = 0.001,
) -> LambdaLR:
    """lr = base * gamma ** (number of milestones <= step); see `milestone_iters`."""
    _check_common(total_iters, warmup_iters, warmup_factor)
    if gamma <= 0:
        raise ValueError(f"gamma={gamma}; expected > 0")
    # list(): Hydra hands over a ListConfig
    iters = milestone_iters(list(milestones), total_iters)
    schedule = functools.partial(_multistep, milestones=iters, gamma=float(gamma))
    return _lambda_lr(optimizer, schedule, warmup_iters, warmup_factor)
