"""Test-time augmentation of Mask2Former: one forward per augmentation (scale x flip) per image,
outputs brought back to the original frame, then

- `sem_seg`: the mean of the augmentations' semantic scores (sum over queries of p(class) x mask
  probability), which needs no correspondence between queries: always sound;
- `instances` / `panoptic`: the queries averaged one by one (class probabilities and mask
  probabilities), then the model's own instance and panoptic inference. The learned queries
  usually keep their object under a flip or a mild rescale, but nothing guarantees it, so a query
  is averaged only over the augmentations whose mask for it agrees with the reference pass's
  (the unflipped pass at scale 1.0, else the first): binarised-mask IoU >= 0.5, or both empty.
  A query that drifted to another object in some augmentation keeps its reference prediction
  for those, rather than a blend of two objects.

Memory: the running sums are (Q, H, W) and (C, H, W) per image at the original size, as the model's
own post-processing holds; one augmentation's outputs are held at a time.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as nnf

from segtrain.inference.tta import TTAOptions, restored, same_size_groups, scaled_size
from segtrain.models.mask2former.inference import semantic_scores
from segtrain.tasks.instance import _size

AGREEMENT_IOU = 0.5  # a query's mask must overlap the reference pass's this much to be averaged
_EPS = 1e-6


def predict_mask2former(task: Any, model: nn.Module, batch: dict[str, Any],
                        options: TTAOptions) -> list[dict[str, Any]]:
    """Mask2FormerTask predictions (segtrain.predictions) with test-time augmentation (module
    docstring). Images of one size run together, unpadded: each augmentation pads to its own size."""
    augs = options.augmentations()
    first = augs.index((1.0, False)) if (1.0, False) in augs else 0
    order = [augs[first], *(aug for k, aug in enumerate(augs) if k != first)]  # the reference first
    predictions: list[dict[str, Any] | None] = [None] * len(batch["sizes"])
    for group in same_size_groups(batch["sizes"]):
        height, width = batch["sizes"][group[0]]
        images = batch["images"][group, :, :height, :width].float()
        origs = [_size(batch["targets"][i], images[0]) for i in group]
        base = _base_scale(task, height, width)
        averages = [QueryAverage(with_semantic="sem_seg" in task.prediction_keys) for _ in group]
        for scale, flipped in order:
            class_logits, masks = _one_pass(task, model, images, base * scale, flipped)
            for j, (average, orig) in enumerate(zip(averages, origs)):
                average.add(class_logits[j], restored(masks[j:j + 1], orig, flipped)[0])
        for i, average in zip(group, averages):
            predictions[i] = average.outputs(task)
    return predictions  # type: ignore[return-value]


def _base_scale(task: Any, height: int, width: int) -> float:
    """The scale the task's own test resize (`test_size` [short, max_long]) applies, else 1."""
    if task.test_size is None:
        return 1.0
    short, longest = task.test_size
    return min(short / min(height, width), longest / max(height, width))


def _one_pass(task: Any, model: nn.Module, images: torch.Tensor, scale: float, flipped: bool
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(class logits (N, Q, C + 1), mask logits (N, Q, h, w) at the augmented image's size, still
    mirrored when `flipped`) of one augmentation of float uint8-range images (N, 3, H, W)."""
    height, width = images.shape[-2:]
    if scale != 1.0:
        size = scaled_size(height, width, scale)
        images = nnf.interpolate(images, size=size, mode="bilinear", align_corners=False,
                                 antialias=True).round().clamp(0, 255)
    if flipped:
        images = images.flip(-1)
    h, w = images.shape[-2:]
    div = task.size_divisibility
    padded = nnf.pad(images, (0, -(-w // div) * div - w, 0, -(-h // div) * div - h))
    outputs = model(task.normalize(padded))
    masks = nnf.interpolate(outputs["pred_masks"].float(), size=padded.shape[-2:],
                            mode="bilinear", align_corners=False)[:, :, :h, :w]
    return outputs["pred_logits"].float(), masks


class QueryAverage:
    """Running query-wise averages of one image's passes; the first pass added is the reference
    the others' masks are compared with (module docstring)."""

    def __init__(self, with_semantic: bool = True) -> None:
        self.with_semantic = with_semantic
        self.reference: torch.Tensor | None = None
        self.class_sum = self.mask_sum = self.weight = self.semantic = None

    def add(self, class_logits: torch.Tensor, mask_logits: torch.Tensor) -> None:
        """One pass: class logits (Q, C + 1), mask logits (Q, H, W) in the original frame."""
        binary = mask_logits > 0
        if self.reference is None:
            self.reference = binary
            self.class_sum = torch.zeros_like(class_logits)
            self.mask_sum = torch.zeros_like(mask_logits)
            self.weight = class_logits.new_zeros((class_logits.shape[0],))
        if self.with_semantic:
            scores = semantic_scores(class_logits, mask_logits)
            self.semantic = scores if self.semantic is None else self.semantic.add_(scores)
        agree = _mask_agreement(binary, self.reference).to(class_logits.dtype)  # (Q,)
        self.class_sum += agree[:, None] * class_logits.softmax(-1)
        self.mask_sum += agree[:, None, None] * mask_logits.sigmoid()
        self.weight += agree

    def averaged(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(class logits, mask logits) whose softmax / sigmoid are the averaged probabilities."""
        # the reference agrees with itself: every weight is >= 1
        probs = self.class_sum / self.weight[:, None]
        mask_probs = (self.mask_sum / self.weight[:, None, None]).clamp(_EPS, 1 - _EPS)
        return probs.clamp_min(_EPS).log(), torch.logit(mask_probs)

    def outputs(self, task: Any) -> dict[str, Any]:
        """The task's outputs (the model's own inference) from the averaged queries; `sem_seg`
        the argmax of the mean semantic scores."""
        out = task._outputs(*self.averaged())
        if self.semantic is not None:
            out["sem_seg"] = self.semantic.argmax(0)
        return out


def _mask_agreement(masks: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """bool (Q,): each query's binary mask has IoU >= AGREEMENT_IOU with the reference's, or both
    are empty."""
    inter = (masks & reference).flatten(1).sum(1).float()
    union = (masks | reference).flatten(1).sum(1).float()
    return torch.where(union > 0, inter >= AGREEMENT_IOU * union, torch.ones_like(union, dtype=torch.bool))
