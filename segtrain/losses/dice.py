"""Soft dice loss on softmax probabilities, averaged over classes."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from segtrain.losses.masking import check_inputs, split_ignored


class DiceLoss(nn.Module):
    """`mean_c (1 - (2 * sum(p_c * g_c) + smooth) / (sum(p_c^e) + sum(g_c^e) + smooth))`.

    `p_c` are softmax probabilities, `g_c` the one-hot labels, sums run over every non-ignored
    pixel of the batch (one dice per class for the whole batch, steadier than per image when a
    class covers few pixels). `exponent` e=2 is the V-Net form MMSegmentation uses by default;
    e=1 is the plain Sørensen form. A class absent from both prediction and labels scores ~0 loss
    thanks to `smooth`. An all-ignored batch gives 0.
    """

    def __init__(self, ignore_index: int = 255, smooth: float = 1.0, exponent: int = 2) -> None:
        super().__init__()
        if smooth < 0:
            raise ValueError(f"DiceLoss: smooth={smooth}; expected >= 0")
        if exponent not in (1, 2):
            raise ValueError(f"DiceLoss: exponent={exponent}; expected 1 or 2")
        self.ignore_index, self.smooth, self.exponent = ignore_index, float(smooth), exponent

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """logits float (N, C, H, W), target int64 (N, H, W) -> float32 scalar in [0, 1]."""
        check_inputs(logits, target, "DiceLoss")
        valid, safe_target = split_ignored(target, self.ignore_index)
        mask = valid.unsqueeze(1)
        prob = logits.float().softmax(dim=1)
        prob = torch.where(mask, prob, torch.zeros_like(prob))
        onehot = F.one_hot(safe_target, logits.shape[1]).permute(0, 3, 1, 2).float() * mask
        dims = (0, 2, 3)
        intersection = (prob * onehot).sum(dims)
        cardinality = (prob**self.exponent).sum(dims) + onehot.sum(dims)  # onehot^e == onehot
        # clamp only guards smooth=0 on an empty batch; the result is then zeroed just below
        dice = (2 * intersection + self.smooth) / (cardinality + self.smooth).clamp(min=1e-12)
        return (1.0 - dice).mean() * valid.any()
