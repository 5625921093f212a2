"""Joint image/target augmentation pipelines built from `torchvision.transforms.v2`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F


class RandomScale(v2.Transform):
    """Resize by a factor drawn uniformly from `scale_range` (bilinear images, nearest masks)."""

    def __init__(self, scale_range: Sequence[float]) -> None:
        super().__init__()
        low, high = (float(s) for s in scale_range)
        if not 0 < low <= high:
            raise ValueError(f"scale_range={tuple(scale_range)}: expected 0 < low <= high")
        self.scale_range = (low, high)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        low, high = self.scale_range
        factor = low + (high - low) * float(torch.rand(()))
        return {"size": [max(1, round(height * factor)), max(1, round(width * factor))]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return F.resize(inpt, params["size"], antialias=True)


class PadToSize(v2.Transform):
    """Pad on the right and bottom up to at least `size` (H, W).

    Images are padded with 0, label maps with `ignore_index` and boolean instance masks with
    False; boxes keep their coordinates. (v2's own `fill` is chosen per type, and label maps
    and instance masks are both `Mask`.)
    """

    def __init__(self, size: int | Sequence[int], ignore_index: int = 255) -> None:
        super().__init__()
        self.size, self.ignore_index = _pair(size, "crop_size"), int(ignore_index)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        return {
            "padding": [0, 0, max(0, self.size[1] - width), max(0, self.size[0] - height)]
        }

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        padding = params["padding"]
        if not any(padding):
            return inpt
        if isinstance(inpt, tv_tensors.Mask):
            fill = 0 if inpt.dtype == torch.bool else self.ignore_index
            return F.pad(inpt, padding, fill=fill)
        if isinstance(inpt, (tv_tensors.Image, tv_tensors.BoundingBoxes)):
            return F.pad(inpt, padding, fill=0)
        return inpt


def semantic_train_transforms(
    hflip_prob: float = 0.5,
    scale_range: Sequence[float] | None = None,
    crop_size: int | Sequence[int] | None = None,
    ignore_index: int = 255,
) -> v2.Compose:
    """Random rescale -> pad and random crop to `crop_size` -> horizontal flip, each optional.

    Called as `image, target = t(image, target)`; masks and boxes in `target` follow the image,
    plain tensors (labels, orig_size) pass through. Draws from torch's global RNG.
    """
    if not 0.0 <= hflip_prob <= 1.0:
        raise ValueError(f"hflip_prob={hflip_prob}: expected a probability in [0, 1]")
    steps: list[v2.Transform] = []
    if scale_range is not None:
        steps.append(RandomScale(tuple(scale_range)))
    if crop_size is not None:
        size = _pair(crop_size, "crop_size")
        steps += [PadToSize(size, ignore_index), v2.RandomCrop(size)]
    if hflip_prob > 0:
        steps.append(v2.RandomHorizontalFlip(hflip_prob))
    return v2.Compose(steps)


def semantic_eval_transforms() -> None:
    """No evaluation transform: models see the full image and predict at its size."""
    return None


def instance_train_transforms(
    hflip_prob: float = 0.5,
    scale_range: Sequence[float] | None = None,
    crop_size: int | Sequence[int] | None = None,
) -> v2.Compose:
    """Random rescale -> pad and random crop to `crop_size` -> horizontal flip, for instance targets.

    Boxes (`BoundingBoxes`) and masks bool (N, H, W) follow the image. After a rescale or crop,
    instances whose box fell below 1 pixel are removed with their mask, label and iscrowd
    entries (`SanitizeBoundingBoxes`). Mask R-CNN resizes its inputs itself, so the default is
    the flip alone (torchvision's and detectron2's reference recipe).
    """
    steps = list(semantic_train_transforms(hflip_prob, scale_range, crop_size).transforms)
    if scale_range is not None or crop_size is not None:
        steps.append(v2.SanitizeBoundingBoxes(labels_getter=_instance_labels))
    return v2.Compose(steps)


def _instance_labels(inputs: Any) -> tuple[torch.Tensor, ...]:
    """The per-instance tensors besides boxes and masks that sanitizing must filter."""
    target = inputs[1]
    return tuple(target[key] for key in ("labels", "iscrowd") if key in target)


def _pair(size: int | Sequence[int], name: str) -> tuple[int, int]:
    if isinstance(size, int):
        size = (size, size)
    pair = tuple(int(s) for s in size)
    if len(pair) != 2 or min(pair) < 1:
        raise ValueError(f"{name}={size}: expected a positive int or (height, width)")
    return pair  # type: ignore[return-value]
