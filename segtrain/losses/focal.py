"""Multi-class softmax focal loss (Lin et al. 2017) for dense prediction."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from segtrain.losses.masking import check_inputs, safe_divide, split_ignored, weights_for


class FocalLoss(nn.Module):
    """Mean over non-ignored pixels of `-alpha_t * (1 - p_t)^gamma * log(p_t)`.

    `p_t` is the softmax probability of the pixel's true class. `alpha` is None (1 for all),
    a float (one factor for every class) or a list (one factor per class, picked by the label).
    The mean divides by the number of valid pixels, not by the alphas, as the RetinaNet paper
    normalises; with `gamma=0` and no alpha this is exactly cross-entropy.
    """

    def __init__(
        self,
        ignore_index: int = 255,
        gamma: float = 2.0,
        alpha: float | Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        if gamma < 0:
            raise ValueError(f"FocalLoss: gamma={gamma}; expected >= 0")
        self.ignore_index, self.gamma = ignore_index, float(gamma)
        self.scalar_alpha: float | None = None
        per_class = None
        if isinstance(alpha, (int, float)):
            self.scalar_alpha = float(alpha)
        elif alpha is not None:
            per_class = torch.tensor([float(a) for a in alpha], dtype=torch.float32)
        self.register_buffer("alpha", per_class, persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """logits float (N, C, H, W), target int64 (N, H, W) -> float32 scalar."""
        check_inputs(logits, target, "FocalLoss")
        valid, safe_target = split_ignored(target, self.ignore_index)
        log_pt = logits.float().log_softmax(dim=1).gather(1, safe_target.unsqueeze(1)).squeeze(1)
        # clamp: rounding can make p_t a hair above 1, and a negative base breaks fractional gamma
        focus = (1.0 - log_pt.exp()).clamp(min=0.0) ** self.gamma
        loss = -focus * log_pt
        if self.scalar_alpha is not None:
            loss = loss * self.scalar_alpha
        alpha = weights_for(self.alpha, logits, "FocalLoss (alpha)")
        if alpha is not None:
            loss = loss * alpha[safe_target]
        loss = torch.where(valid, loss, torch.zeros_like(loss))
        return safe_divide(loss.sum(), valid.sum().float())
