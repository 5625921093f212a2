"""Pixel-wise cross-entropy and its online hard example mining (OHEM) variant."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from segtrain.losses.masking import (
    check_inputs,
    class_weight_tensor,
    safe_divide,
    split_ignored,
    weights_for,
)


def _pixel_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    ignore_index: int,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pixel loss float32 (N, H, W) (0 at ignored pixels) and each pixel's normaliser weight.

    The normaliser is the class weight of the pixel's label (1 without weights, 0 if ignored),
    so sum(loss) / sum(norm) is exactly `F.cross_entropy(..., reduction="mean")`.
    """
    # log-softmax over many classes overflows in half precision: always float32
    loss = F.cross_entropy(
        logits.float(), target, weight=weight, ignore_index=ignore_index,
        reduction="none", label_smoothing=label_smoothing,
    )
    valid, safe_target = split_ignored(target, ignore_index)
    norm = valid.float() if weight is None else weight[safe_target] * valid
    return loss, norm


class CrossEntropyLoss(nn.Module):
    """Mean cross-entropy over non-ignored pixels, as `F.cross_entropy` with `reduction="mean"`.

    With `class_weights` the mean is weighted (divided by the sum of the pixels' class weights),
    as PyTorch does. An all-ignored batch gives 0 instead of PyTorch's NaN.
    """

    def __init__(
        self,
        ignore_index: int = 255,
        class_weights: Sequence[float] | str | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        if not 0.0 <= label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing={label_smoothing}; expected a value in [0, 1]")
        self.ignore_index, self.label_smoothing = ignore_index, float(label_smoothing)
        self.register_buffer(
            "class_weights", class_weight_tensor(class_weights, "CrossEntropyLoss"),
            persistent=False,
        )

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """logits float (N, C, H, W), target int64 (N, H, W) -> float32 scalar."""
        check_inputs(logits, target, "CrossEntropyLoss")
        weight = weights_for(self.class_weights, logits, "CrossEntropyLoss")
        loss, norm = _pixel_cross_entropy(
            logits, target, weight, self.ignore_index, self.label_smoothing
        )
        return safe_divide(loss.sum(), norm.sum())


class OhemCrossEntropyLoss(nn.Module):
    """Cross-entropy over the hard pixels only (online hard example mining, HRNet/MMSegmentation).

    A valid pixel is kept when the softmax probability of its true class is below `thresh`, and
    the `min_kept` lowest-probability pixels of the batch (the whole batch, as HRNet counts) are
    kept whatever their probability, so easy batches still train. Unlike HRNet, all valid pixels
    are kept when there are fewer than `min_kept`. The kept pixels' losses are averaged as
    `CrossEntropyLoss` does, so `thresh=1` reproduces it.
    """

    def __init__(
        self,
        ignore_index: int = 255,
        thresh: float = 0.7,
        min_kept: int = 100_000,
        class_weights: Sequence[float] | str | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 <= thresh <= 1.0:
            raise ValueError(f"OhemCrossEntropyLoss: thresh={thresh}; expected a probability")
        if min_kept < 0:
            raise ValueError(f"OhemCrossEntropyLoss: min_kept={min_kept}; expected >= 0")
        self.ignore_index, self.thresh, self.min_kept = ignore_index, float(thresh), int(min_kept)
        self.register_buffer(
            "class_weights", class_weight_tensor(class_weights, "OhemCrossEntropyLoss"),
            persistent=False,
        )

    @torch.no_grad()
    def kept_mask(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """bool (N, H, W): the pixels that contribute to the loss (never an ignored one)."""
        valid, safe_target = split_ignored(target, self.ignore_index)
        prob = logits.float().softmax(dim=1).gather(1, safe_target.unsqueeze(1)).squeeze(1)
        kept = prob < self.thresh
        if self.min_kept > 0:
            # Ignored pixels sort last (probability 2), so the k-th smallest of the batch is the
            # k-th hardest valid pixel, or 2 (keep every valid pixel) when there are fewer than k;
            # no boolean indexing, hence no device sync.
            ranked = torch.where(valid, prob, torch.full_like(prob, 2.0)).flatten().sort().values
            kth = ranked[min(self.min_kept, ranked.numel()) - 1]
            kept |= prob <= kth
        return kept & valid

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """logits float (N, C, H, W), target int64 (N, H, W) -> float32 scalar."""
        check_inputs(logits, target, "OhemCrossEntropyLoss")
        weight = weights_for(self.class_weights, logits, "OhemCrossEntropyLoss")
        loss, norm = _pixel_cross_entropy(logits, target, weight, self.ignore_index)
        kept = self.kept_mask(logits, target)
        loss = torch.where(kept, loss, torch.zeros_like(loss))
        return safe_divide(loss.sum(), (norm * kept).sum())
