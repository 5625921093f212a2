"""Joint image/target augmentation pipelines built from `torchvision.transforms.v2`.

Each transform is called as `image, target = t(image, target)` with a uint8 `tv_tensors.Image`
(3, H, W) and a target dict: `Mask`s and `BoundingBoxes` follow the image geometrically, plain
tensors (labels, segment tables, orig_size) pass through. The presets below are MMSegmentation's
and detectron2's recipes; the single transforms compose in YAML too (a `v2.Compose` whose
`transforms` list names them). Normalisation is deliberately absent: the tasks normalise uint8
batches on the device. Randomness comes from torch's global RNG, which the loader seeds per worker.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from segtrain.data.datasets.panoptic import PanopticMap, masks_to_boxes
from segtrain.data.transforms.photometric import PhotoMetricDistortion
from segtrain.data.transforms.window_resize import nearest_indices, resize_window, take_window

__all__ = [
    "PadToMultiple", "PadToSize", "PanopticMap", "PhotoMetricDistortion", "RandomCrop", "RandomResize",
    "RandomScale", "ResizeCrop", "SanitizePanoptic", "instance_train_transforms", "panoptic_train_transforms",
    "semantic_eval_transforms", "semantic_train_transforms",
]


def _pad(inpt: Any, padding: list[int], ignore_index: int) -> Any:
    """Pad (left, top, right, bottom): images and boxes 0, label maps `ignore_index`,
    panoptic maps 0 (VOID), bool instance masks False. (v2's own `fill` goes by type, and all
    three kinds of map are `Mask`.)"""
    if not any(padding):
        return inpt
    fill = 0
    if isinstance(inpt, tv_tensors.Mask) and not isinstance(inpt, PanopticMap) and inpt.dtype != torch.bool:
        fill = ignore_index
    return F.pad(inpt, padding, fill=fill)


class _RandomSize(v2.Transform):
    """Resize to `make_params`' size: bilinear (antialiased) images, nearest masks, scaled boxes."""

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return F.resize(inpt, params["size"], antialias=True)


class RandomScale(_RandomSize):
    """Resize by a factor drawn uniformly from `scale_range`, relative to the image's own size."""

    def __init__(self, scale_range: Sequence[float]) -> None:
        super().__init__()
        self.scale_range = _range(scale_range, "scale_range")

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        low, high = self.scale_range
        factor = low + (high - low) * float(torch.rand(()))
        return {"size": [max(1, round(height * factor)), max(1, round(width * factor))]}


class RandomResize(_RandomSize):
    """MMSeg's `RandomResize(scale, ratio_range, keep_ratio=True)`: scale jitter around a base size.

    A ratio r ~ U(ratio_range) gives the bounds int(scale * r); the image is rescaled, aspect kept,
    by the largest factor with long edge <= max(bounds) and short edge <= min(bounds) (mmcv's
    `rescale_size`), so the order of `scale` does not matter: VOC's (2048, 512) x r means a short
    side of 512 r unless the long side reaches 2048 r first.
    """

    def __init__(self, scale: Sequence[int], ratio_range: Sequence[float] = (0.5, 2.0)) -> None:
        super().__init__()
        self.scale = _pair(scale, "scale")
        self.ratio_range = _range(ratio_range, "ratio_range")

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        low, high = self.ratio_range
        ratio = low + (high - low) * float(torch.rand(()))
        bounds = [int(s * ratio) for s in self.scale]
        factor = min(max(bounds) / max(height, width), min(bounds) / min(height, width))
        return {"size": [max(1, int(height * factor + 0.5)), max(1, int(width * factor + 0.5))]}


class RandomCrop(v2.Transform):
    """MMSeg's `RandomCrop(crop_size, cat_max_ratio)`, padded up to `size` (H, W) when smaller.

    The window is drawn up to `max_tries` times until no class covers `cat_max_ratio` or more
    of its labelled pixels (`ignore_index` excluded) and at least two classes occur; otherwise
    the last draw stands. The label map checked is the target's integer, non-panoptic `Mask`
    (`semantic`); without one, or with cat_max_ratio=1, the first draw is taken. A side shorter
    than `size` is kept whole and padded at the bottom/right (image 0, labels `ignore_index`,
    panoptic 0, instance masks False), as MMSeg's crop followed by its pad to `crop_size`.

    Rare-class crops: with probability `rare_class_prob`, when the label map holds any of
    `rare_classes`, the window is instead centred (as far as the frame allows) on a pixel of one
    of them: a class drawn uniformly among those present, then one of its pixels uniformly;
    cat_max_ratio is not applied to that window. With rare_class_prob=0 (default) no extra
    number is drawn, so crops are exactly those without the option.
    """

    def __init__(
        self,
        size: int | Sequence[int],
        cat_max_ratio: float = 1.0,
        ignore_index: int = 255,
        max_tries: int = 10,
        rare_classes: Sequence[int] = (),
        rare_class_prob: float = 0.0,
    ) -> None:
        super().__init__()
        self.size, self.ignore_index = _pair(size, "crop_size"), int(ignore_index)
        if not 0.0 < cat_max_ratio <= 1.0:
            raise ValueError(f"cat_max_ratio={cat_max_ratio}: expected a fraction in (0, 1] (1 = off)")
        self.cat_max_ratio, self.max_tries = float(cat_max_ratio), max(1, int(max_tries))
        if not 0.0 <= rare_class_prob <= 1.0:
            raise ValueError(f"rare_class_prob={rare_class_prob}: expected a probability in [0, 1] (0 = off)")
        if rare_class_prob > 0 and not rare_classes:
            raise ValueError(
                f"rare_class_prob={rare_class_prob} needs rare_classes, the class ids whose pixels "
                "crops are centred on (e.g. rare_classes=[4, 11])"
            )
        self.rare_classes = torch.tensor([int(c) for c in rare_classes], dtype=torch.int64)
        self.rare_class_prob = float(rare_class_prob)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        labels = self._label_map(flat_inputs)

        def window(top: int, left: int, h: int, w: int) -> torch.Tensor:
            return labels[..., top : top + h, left : left + w]

        def rare_pixel() -> tuple[int, int] | None:
            return self.rare_pixel(labels)

        return self.draw(height, width, None if labels is None or self.cat_max_ratio == 1.0 else window,
                         None if labels is None else rare_pixel)

    def _label_map(self, flat_inputs: list[Any]) -> torch.Tensor | None:
        if self.cat_max_ratio == 1.0 and self.rare_class_prob == 0.0:
            return None
        return next((x for x in flat_inputs if _is_label_map(x)), None)

    def rare_pixel(self, labels: torch.Tensor) -> tuple[int, int] | None:
        """(row, column) of a random pixel of a rare class in `labels` (..., H, W); None when
        none is present. Draws from torch's global RNG only when one is."""
        labels = labels.as_subclass(torch.Tensor).reshape(labels.shape[-2:])
        is_rare = torch.isin(labels, self.rare_classes)
        if not bool(is_rare.any()):
            return None
        present = torch.unique(labels[is_rare])
        chosen = present[int(torch.randint(len(present), ()))]
        rows, cols = torch.nonzero(labels == chosen, as_tuple=True)
        k = int(torch.randint(len(rows), ()))
        return int(rows[k]), int(cols[k])

    def draw(
        self,
        height: int,
        width: int,
        window: Callable[[int, int, int, int], torch.Tensor] | None,
        rare_pixel: Callable[[], tuple[int, int] | None] | None = None,
    ) -> dict[str, Any]:
        """The crop of an (height, width) frame; `window(top, left, h, w)` gives the label map
        under a candidate crop for cat_max_ratio (None: the first draw stands); `rare_pixel()`
        a pixel of a rare class in this frame, or None (see the class docstring)."""
        crop_h, crop_w = min(self.size[0], height), min(self.size[1], width)
        padding = [0, 0, self.size[1] - crop_w, self.size[0] - crop_h]
        if self.rare_class_prob > 0 and float(torch.rand(())) < self.rare_class_prob:
            centre = rare_pixel() if rare_pixel is not None else None
            if centre is not None:
                top = min(max(centre[0] - crop_h // 2, 0), height - crop_h)
                left = min(max(centre[1] - crop_w // 2, 0), width - crop_w)
                return {"top": top, "left": left, "height": crop_h, "width": crop_w, "padding": padding}
        for _ in range(self.max_tries):
            top = int(torch.randint(height - crop_h + 1, ()))
            left = int(torch.randint(width - crop_w + 1, ()))
            if window is None or self._balanced(window(top, left, crop_h, crop_w)):
                break
        return {"top": top, "left": left, "height": crop_h, "width": crop_w, "padding": padding}

    def _balanced(self, labels: torch.Tensor) -> bool:
        if labels.dtype == torch.uint8:  # a 256-bin count beats sorting for unique
            counts = torch.bincount(labels.reshape(-1), minlength=256)
            if 0 <= self.ignore_index < 256:
                counts[self.ignore_index] = 0
            counts = counts[counts > 0]
        else:
            classes, counts = torch.unique(labels, return_counts=True)
            counts = counts[classes != self.ignore_index]
        return len(counts) > 1 and float(counts.max()) < self.cat_max_ratio * float(counts.sum())

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        # Crop inside the image first: F.crop past the border would pad masks with 0, not ignore.
        cropped = F.crop(inpt, params["top"], params["left"], params["height"], params["width"])
        return _pad(cropped, params["padding"], self.ignore_index)


class ResizeCrop(v2.Transform):
    """`resize` then `crop` in one step that computes only the window the crop keeps.

    The draws are the two transforms' in a row: the resize's size, then the crop's window in the
    resized frame, cat_max_ratio judged on the resized labels under it. The output equals resizing
    the whole frame and cropping: label, panoptic and instance maps exactly (the nearest source
    rows and columns of the window are gathered); images exactly when a side shrinks (resized
    whole) and within 1 grey level when both grow (see `resize_window`); boxes, as before, are
    resized and cropped. At MMSeg's ratio 2.0 on Cityscapes the kept crop is 1/16 of the frame.
    """

    def __init__(self, resize: RandomResize | RandomScale, crop: RandomCrop) -> None:
        super().__init__()
        self.resize, self.crop = resize, crop

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        size = self.resize.make_params(flat_inputs)["size"]
        rows, cols = nearest_indices(height, size[0]), nearest_indices(width, size[1])
        labels = self.crop._label_map(flat_inputs)

        def window(top: int, left: int, h: int, w: int) -> torch.Tensor:
            return take_window(labels, rows[top : top + h], cols[left : left + w])

        def rare_pixel() -> tuple[int, int] | None:
            pixel = self.crop.rare_pixel(labels)  # in the source frame: scaled to the resized one
            if pixel is None:
                return None
            return (min(int((pixel[0] + 0.5) * size[0] / height), size[0] - 1),
                    min(int((pixel[1] + 0.5) * size[1] / width), size[1] - 1))

        check = None if labels is None or self.crop.cat_max_ratio == 1.0 else window
        params = self.crop.draw(size[0], size[1], check, None if labels is None else rare_pixel)
        return {**params, "size": size, "rows": rows, "cols": cols}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        top, left, height, width = (params[k] for k in ("top", "left", "height", "width"))
        if isinstance(inpt, tv_tensors.Mask):
            rows, cols = params["rows"][top : top + height], params["cols"][left : left + width]
            out = tv_tensors.wrap(take_window(inpt.as_subclass(torch.Tensor), rows, cols), like=inpt)
        elif isinstance(inpt, tv_tensors.Image) or type(inpt) is torch.Tensor:
            out = resize_window(inpt.as_subclass(torch.Tensor), params["size"], top, left, height, width)
            out = tv_tensors.wrap(out, like=inpt) if isinstance(inpt, tv_tensors.Image) else out
        else:  # boxes, videos, PIL images: the two steps as they are
            out = F.crop(F.resize(inpt, params["size"], antialias=True), top, left, height, width)
        return _pad(out, params["padding"], self.crop.ignore_index)


class PadToSize(v2.Transform):
    """Pad on the right and bottom up to at least `size` (H, W); fills as `RandomCrop`'s."""

    def __init__(self, size: int | Sequence[int], ignore_index: int = 255) -> None:
        super().__init__()
        self.size, self.ignore_index = _pair(size, "crop_size"), int(ignore_index)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        return {"padding": [0, 0, max(0, self.size[1] - width), max(0, self.size[0] - height)]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return _pad(inpt, params["padding"], self.ignore_index)


class PadToMultiple(v2.Transform):
    """Pad on the right and bottom so H and W divide by `size_divisor` (the network's stride).

    Images 0, label maps `ignore_index`, panoptic maps 0, instance masks False; boxes keep their
    coordinates (the canvas grows).
    """

    def __init__(self, size_divisor: int = 32, ignore_index: int = 255) -> None:
        super().__init__()
        if int(size_divisor) < 1:
            raise ValueError(f"size_divisor={size_divisor}: expected a positive stride such as 32")
        self.size_divisor, self.ignore_index = int(size_divisor), int(ignore_index)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        return {"padding": [0, 0, -width % self.size_divisor, -height % self.size_divisor]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return _pad(inpt, params["padding"], self.ignore_index)


class SanitizePanoptic(v2.Transform):
    """Make a panoptic target agree with its transformed map again; the last step after crops/resizes.

    `segments` entries whose id no longer occurs in `panoptic` are dropped; instance masks left
    empty are dropped with their `labels` and `iscrowd`, and `boxes` are recomputed from the
    remaining masks (XYXY, exclusive x2/y2), so the target equals what `panoptic_targets` builds
    from the transformed map. `semantic` needs nothing: it moved with the map pixel for pixel.
    """

    def forward(self, *inputs: Any) -> Any:
        image, target = inputs if len(inputs) > 1 else inputs[0]
        if not isinstance(target, dict) or "panoptic" not in target or "segments" not in target:
            keys = list(target) if isinstance(target, dict) else type(target).__name__
            raise KeyError(
                f"SanitizePanoptic needs a panoptic target with 'panoptic' and 'segments' but got {keys}; "
                "use semantic_train_transforms or instance_train_transforms for other datasets"
            )
        panoptic, segments = target["panoptic"], target["segments"]
        keep = torch.isin(segments["ids"], torch.unique(panoptic))
        out = {**target, "segments": {key: value[keep] for key, value in segments.items()}}
        if "masks" in target:
            masks = target["masks"]
            visible = masks.flatten(1).any(1)
            out["masks"] = tv_tensors.wrap(masks[visible], like=masks)
            for key in ("labels", "iscrowd"):
                if key in target:
                    out[key] = target[key][visible]
            out["boxes"] = tv_tensors.BoundingBoxes(
                masks_to_boxes(out["masks"]), format="XYXY", canvas_size=tuple(panoptic.shape[-2:])
            )
        return image, out


def semantic_train_transforms(
    *,
    crop_size: int | Sequence[int] | None = None,
    scale_range: Sequence[float] | None = None,
    scale: Sequence[int] | None = None,
    cat_max_ratio: float = 0.75,
    photometric: bool = False,
    hflip_prob: float = 0.5,
    ignore_index: int = 255,
    rare_classes: Sequence[int] = (),
    rare_class_prob: float = 0.0,
) -> v2.Compose:
    """MMSeg's training pipeline: resize -> crop -> flip -> photometric distortion, each optional;
    a resize followed by a crop is one `ResizeCrop` (same draws and output, only the crop computed).

    scale_range: with `scale` (MMSeg's (2048, 512)), the ratio_range of `RandomResize` around it;
    without, factors of the image's own size (`RandomScale`). crop_size: (H, W) or an int;
    `cat_max_ratio` (1 = off) applies to its crop; smaller images are padded with `ignore_index`.
    `rare_class_prob` > 0 centres that share of the crops on a pixel of one of `rare_classes`
    (train ids) when the image holds one (`RandomCrop`). The defaults keep the flip alone, as
    the synthetic presets train; the dataset YAMLs turn the recipe on.
    """
    if rare_class_prob and crop_size is None:
        raise ValueError(f"rare_class_prob={rare_class_prob} applies to the crop; set crop_size too")
    steps = _geometric_steps(crop_size, scale_range, scale, cat_max_ratio, hflip_prob, ignore_index,
                             rare_classes=rare_classes, rare_class_prob=rare_class_prob)
    if photometric:
        steps.append(PhotoMetricDistortion())
    return v2.Compose(steps)


def semantic_eval_transforms() -> None:
    """No evaluation transform: models see the full image and predict at its size."""
    return None


def instance_train_transforms(
    *,
    crop_size: int | Sequence[int] | None = None,
    scale_range: Sequence[float] | None = None,
    scale: Sequence[int] | None = None,
    photometric: bool = False,
    hflip_prob: float = 0.5,
) -> v2.Compose:
    """Resize -> pad and crop -> flip -> photometric, for instance targets (no cat_max_ratio).

    Boxes (`BoundingBoxes`) and masks bool (N, H, W) follow the image. After a resize or crop,
    instances whose box fell below 1 pixel are removed with their mask, label and iscrowd
    entries (`SanitizeBoundingBoxes`). Mask R-CNN resizes its inputs itself, so the default is
    the flip alone (torchvision's and detectron2's reference recipe).
    """
    steps = _geometric_steps(crop_size, scale_range, scale, 1.0, hflip_prob, 255)
    if photometric:
        steps.append(PhotoMetricDistortion())
    if scale_range is not None or crop_size is not None:
        steps.append(v2.SanitizeBoundingBoxes(labels_getter=_instance_labels))
    return v2.Compose(steps)


def panoptic_train_transforms(
    *,
    crop_size: int | Sequence[int] | None = None,
    scale_range: Sequence[float] | None = None,
    scale: Sequence[int] | None = None,
    cat_max_ratio: float = 1.0,
    photometric: bool = False,
    hflip_prob: float = 0.5,
    ignore_index: int = 255,
) -> v2.Compose:
    """The semantic pipeline for panoptic targets, then `SanitizePanoptic` after a resize or crop.

    `panoptic` (a `PanopticMap`) pads with 0 (VOID), `semantic` with `ignore_index`; segments
    and instances cut away are dropped so every key still describes the same segments.
    cat_max_ratio is off by default (detectron2's panoptic recipes crop without it); when set,
    it judges crops by `semantic`.
    """
    steps = _geometric_steps(crop_size, scale_range, scale, cat_max_ratio, hflip_prob, ignore_index)
    if photometric:
        steps.append(PhotoMetricDistortion())
    if scale_range is not None or crop_size is not None:
        steps.append(SanitizePanoptic())
    return v2.Compose(steps)


def _geometric_steps(
    crop_size: int | Sequence[int] | None,
    scale_range: Sequence[float] | None,
    scale: Sequence[int] | None,
    cat_max_ratio: float,
    hflip_prob: float,
    ignore_index: int,
    *,
    rare_classes: Sequence[int] = (),
    rare_class_prob: float = 0.0,
) -> list[v2.Transform]:
    if not 0.0 <= hflip_prob <= 1.0:
        raise ValueError(f"hflip_prob={hflip_prob}: expected a probability in [0, 1]")
    if scale is not None and scale_range is None:
        raise ValueError(
            f"scale={tuple(scale)} needs scale_range, the ratio range around it (MMSeg: [0.5, 2.0])"
        )
    steps: list[v2.Transform] = []
    if scale is not None:
        steps.append(RandomResize(scale, scale_range))  # type: ignore[arg-type]
    elif scale_range is not None:
        steps.append(RandomScale(scale_range))
    if crop_size is not None:
        steps.append(RandomCrop(crop_size, cat_max_ratio, ignore_index,
                                rare_classes=rare_classes, rare_class_prob=rare_class_prob))
        if len(steps) == 2:  # resize + crop: compute the kept window only
            steps = [ResizeCrop(*steps)]
    if hflip_prob > 0:
        steps.append(v2.RandomHorizontalFlip(hflip_prob))
    return steps


def _is_label_map(inpt: Any) -> bool:
    return (
        isinstance(inpt, tv_tensors.Mask)
        and not isinstance(inpt, PanopticMap)
        and inpt.dtype != torch.bool
    )


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


def _range(values: Sequence[float], name: str) -> tuple[float, float]:
    low, high = (float(v) for v in values)
    if not 0 < low <= high:
        raise ValueError(f"{name}={tuple(values)}: expected 0 < low <= high")
    return low, high
