"""Lovász-softmax loss (Berman et al. 2018), a convex surrogate of per-class IoU."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from segtrain.losses.masking import check_inputs, safe_divide, split_ignored


def _lovasz_per_class(errors: torch.Tensor, fg: torch.Tensor) -> torch.Tensor:
    """Lovász extension of the Jaccard loss, per group and class.

    errors, fg: float32 (B, P, C), `|fg - p|` and the one-hot labels, both 0 at ignored pixels.
    Ignored pixels (error 0) sort last, where their weight multiplies a zero error, so they need
    not be removed — removing them would cost a device sync. Returns float32 (B, C).
    """
    errors, order = errors.sort(dim=1, descending=True)
    fg = fg.gather(1, order)
    total = fg.sum(dim=1, keepdim=True)
    intersection = total - fg.cumsum(dim=1)
    union = total + (1.0 - fg).cumsum(dim=1)  # >= 1 everywhere, no division by zero
    jaccard = 1.0 - intersection / union
    grad = torch.cat([jaccard[:, :1], jaccard[:, 1:] - jaccard[:, :-1]], dim=1)
    return (errors * grad).sum(dim=1)


class LovaszSoftmaxLoss(nn.Module):
    """Lovász-softmax on softmax probabilities, averaged over classes.

    `classes`: "present" averages over the classes that occur in the labels (of the batch, or
    of each image with `per_image`), "all" over every class, or a list of class indices.
    `per_image=True` averages the per-image losses over the images that have valid pixels
    (the reference also counts fully ignored images, as zeros).
    """

    def __init__(
        self,
        ignore_index: int = 255,
        per_image: bool = False,
        classes: str | Sequence[int] = "present",
    ) -> None:
        super().__init__()
        if isinstance(classes, str) and classes not in ("present", "all"):
            raise ValueError(
                f"LovaszSoftmaxLoss: classes={classes!r}; expected 'present', 'all' or a list "
                "of class indices"
            )
        self.ignore_index, self.per_image = ignore_index, per_image
        self.classes = classes if isinstance(classes, str) else [int(c) for c in classes]

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """logits float (N, C, H, W), target int64 (N, H, W) -> float32 scalar."""
        check_inputs(logits, target, "LovaszSoftmaxLoss")
        num_classes = logits.shape[1]
        valid, safe_target = split_ignored(target, self.ignore_index)
        groups = logits.shape[0] if self.per_image else 1
        mask = valid.reshape(groups, -1, 1)
        prob = logits.float().softmax(dim=1).permute(0, 2, 3, 1).reshape(groups, -1, num_classes)
        fg = F.one_hot(safe_target, num_classes).reshape(groups, -1, num_classes).float() * mask
        errors = torch.where(mask, (fg - prob).abs(), torch.zeros_like(prob))
        losses = _lovasz_per_class(errors, fg)  # (groups, C)

        if self.classes == "present":
            chosen = fg.sum(dim=1) > 0
        else:
            chosen = torch.zeros_like(losses, dtype=torch.bool)
            picked = range(num_classes) if self.classes == "all" else self.classes
            chosen[:, list(picked)] = True
        per_group = safe_divide((losses * chosen).sum(dim=1), chosen.sum(dim=1).float())
        has_pixels = mask.flatten(1).any(dim=1).float()
        return safe_divide((per_group * has_pixels).sum(), has_pixels.sum())


def lovasz_hinge_per_mask(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Binary Lovász hinge (Berman et al. 2018) of each row, as the reference's `lovasz_hinge`
    with per_image over rows: logits float (M, P) (> 0 = foreground), labels bool (M, P) ->
    float32 (M,). Hinge errors <= 0 add nothing, so they are clamped before the shared sort."""
    fg = labels.float()
    errors = (1.0 - logits.float() * (2.0 * fg - 1.0)).relu()
    return _lovasz_per_class(errors.t()[None], fg.t()[None])[0]
