"""Shape checks, ignore masks and sync-free normalisation shared by the segmentation losses."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def check_inputs(logits: torch.Tensor, target: torch.Tensor, name: str) -> None:
    """Raise ValueError unless logits is float (N, C, H, W) and target int64 (N, H, W)."""
    if logits.dim() != 4 or not logits.is_floating_point():
        raise ValueError(
            f"{name}: logits must be a float tensor (N, C, H, W); got {logits.dtype} "
            f"of shape {tuple(logits.shape)}"
        )
    expected = (logits.shape[0], *logits.shape[2:])
    if tuple(target.shape) != expected or target.dtype != torch.int64:
        raise ValueError(
            f"{name}: target must be int64 of shape {expected} to match logits "
            f"{tuple(logits.shape)}; got {target.dtype} of shape {tuple(target.shape)}"
        )


def split_ignored(target: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(valid bool (N, H, W), target with ignored pixels set to class 0, safe for gather)."""
    valid = target != ignore_index
    return valid, torch.where(valid, target, torch.zeros_like(target))


def safe_divide(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """numerator / denominator, or 0 where the denominator is 0 (an all-ignored batch).

    Tensor ops only: branching on the count in Python would cost a device sync every step.
    """
    ones = torch.ones_like(denominator)
    return numerator / torch.where(denominator > 0, denominator, ones)


def class_weight_tensor(
    class_weights: Sequence[float] | str | None, name: str
) -> torch.Tensor | None:
    """float32 (C,) from a list of per-class weights (None stays None); negatives are an error."""
    if class_weights is None:
        return None
    if isinstance(class_weights, str):
        raise ValueError(f"{name}: class_weights={class_weights!r} is resolved from the training set by "
                         "`segtrain train` (auto | median_frequency | inverse); built directly, it needs "
                         "a list of weights, one per class")
    weights = torch.tensor([float(w) for w in class_weights], dtype=torch.float32)
    if weights.dim() != 1 or weights.numel() == 0 or bool((weights < 0).any()):
        raise ValueError(
            f"{name}: class_weights={list(class_weights)} must be a non-empty list of "
            "non-negative floats, one per class"
        )
    return weights


def weights_for(
    weights: torch.Tensor | None, logits: torch.Tensor, name: str
) -> torch.Tensor | None:
    """The per-class weights on the logits' device, checked against the number of classes."""
    if weights is None:
        return None
    if weights.numel() != logits.shape[1]:
        raise ValueError(
            f"{name}: class_weights has {weights.numel()} entries but logits have "
            f"{logits.shape[1]} classes; give one weight per class"
        )
    return weights.to(device=logits.device)
