"""Pictures of predictions for people: class colours blended over the image, outlines, boxes and
names. A panoptic prediction is drawn alone (it merges the others); otherwise the semantic map,
then the instances at or above the score threshold on top, best last.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from segtrain.data.meta import DatasetMeta
from segtrain.predictions import instance_meta, semantic_labels

ALPHA = 0.5  # opacity of the class colours over the image
_SHADES = (0.0, 0.35, -0.35, 0.6, -0.55, 0.2, -0.2)  # per-instance lighter/darker variants
_LABEL_MIN_AREA = 0.004  # regions smaller than this share of the image get no name...
_LABEL_MIN_SIDE = 2.0  # ...nor those smaller than a square of this many text heights
_PLACEMENT_SIZE = 96  # side of the coarse grid where name positions are searched
_EDGE_BRIGHTNESS = 0.6  # outlines darker than the fill, so touching regions stay apart
_BACKGROUND = "background"  # a semantic class of this name is not coloured (black would darken all)


_fonts = threading.local()


def render_overlay(image: torch.Tensor, prediction: dict[str, Any], meta: DatasetMeta,
                   score_thresh: float = 0.5, alpha: float = ALPHA) -> Image.Image:
    """RGB picture of one image's prediction (the contract of `segtrain.predictions`).

    image: uint8 (3, H, W) at the prediction's size. Instances scoring below `score_thresh` are
    left out.
    """
    canvas = image.permute(1, 2, 0).numpy().astype(np.float32)
    labels: list[tuple[str, tuple[float, float], str]] = []  # text, (x, y), anchor
    boxes: list[tuple[list[float], tuple[int, int, int]]] = []
    if "panoptic" in prediction:
        _draw_panoptic(canvas, _numpy(prediction["panoptic"]), prediction["segments"], meta, alpha, labels)
    else:
        if "sem_seg" in prediction:
            _draw_semantic(canvas, _numpy(semantic_labels(prediction["sem_seg"])), meta, alpha, labels)
        if "instances" in prediction:
            _draw_instances(canvas, prediction["instances"], meta, score_thresh, alpha, labels, boxes)
    picture = Image.fromarray(canvas.round().clip(0, 255).astype(np.uint8))
    _annotate(picture, boxes, labels)
    return picture


def _numpy(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if torch.is_tensor(x) else np.asarray(x)


def _thickness(shape: Sequence[int]) -> int:
    return max(1, round(min(shape[:2]) / 400))


def _text_size(shape: Sequence[int]) -> int:
    return int(np.clip(min(shape[:2]) / 32, 10, 28))


def _min_label_area(shape: Sequence[int]) -> float:
    """Pixels a region needs to get its name written on it (small ones would drown in text)."""
    return max(_LABEL_MIN_AREA * shape[0] * shape[1], (_LABEL_MIN_SIDE * _text_size(shape)) ** 2)


def _shade(colour: Sequence[int], index: int) -> np.ndarray:
    """A lighter or darker variant of `colour`, the same for the same `index`."""
    rgb = np.asarray(colour, dtype=np.float32)
    t = _SHADES[index % len(_SHADES)]
    return rgb + t * (255 - rgb) if t >= 0 else rgb * (1 + t)


def _erode(mask: np.ndarray, times: int) -> np.ndarray:
    """4-neighbour erosion, `times` over; pixels beyond the border count as inside."""
    out = mask.copy()
    for _ in range(times):
        core = out.copy()
        core[1:] &= out[:-1]
        core[:-1] &= out[1:]
        core[:, 1:] &= out[:, :-1]
        core[:, :-1] &= out[:, 1:]
        out = core
    return out


def _fill(canvas: np.ndarray, mask: np.ndarray, colour: np.ndarray, alpha: float, thickness: int) -> None:
    """Blend `colour` over the mask's pixels and paint its inner outline opaque (darker), within the mask's
    bounding box (hot path for many instances: the rest of the image is not touched)."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if not len(rows):
        return
    window = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    part, region = mask[window], canvas[window]
    region[part] = region[part] * (1 - alpha) + colour * alpha
    region[part & ~_erode(part, thickness)] = colour * _EDGE_BRIGHTNESS


def _label_points(mask: np.ndarray, min_area: float) -> list[tuple[float, float]]:
    """(x, y) deep inside each connected part of the mask covering >= `min_area` pixels: the
    middle of what survives the most erosions, on a coarse grid (a centroid may fall outside a
    ring or a crescent)."""
    step = max(1, -(-max(mask.shape) // _PLACEMENT_SIZE))
    coarse = mask[step // 2::step, step // 2::step]
    parts = _components(coarse)
    points = []
    for part in range(1, int(parts.max()) + 1):
        region = parts == part
        if region.sum() * step * step < min_area:
            continue
        last = region
        while True:
            core = _erode(last, 1)
            core[0], core[-1], core[:, 0], core[:, -1] = False, False, False, False  # the border is edge
            if not core.any():
                break
            last = core
        ys, xs = np.nonzero(last)
        middle = np.argmin((ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2)
        points.append((float(xs[middle] * step + step // 2), float(ys[middle] * step + step // 2)))
    return points


def _components(mask: np.ndarray) -> np.ndarray:
    """4-connected parts of a small bool mask: int (H, W), 0 outside, parts numbered 1..P.

    Each pixel takes the largest index among its neighbours until nothing changes (a coarse grid
    of ~100 x 100 needs at most a few hundred cheap passes), then the indices are renumbered.
    """
    labels = np.where(mask, np.arange(1, mask.size + 1).reshape(mask.shape), 0)
    while True:
        grown = labels.copy()
        np.maximum(grown[1:], labels[:-1], out=grown[1:])
        np.maximum(grown[:-1], labels[1:], out=grown[:-1])
        np.maximum(grown[:, 1:], labels[:, :-1], out=grown[:, 1:])
        np.maximum(grown[:, :-1], labels[:, 1:], out=grown[:, :-1])
        grown[~mask] = 0
        if np.array_equal(grown, labels):
            break
        labels = grown
    _, renumbered = np.unique(labels, return_inverse=True)
    return renumbered.reshape(mask.shape)


def _draw_semantic(canvas: np.ndarray, labels: np.ndarray, meta: DatasetMeta, alpha: float,
                   names: list) -> None:
    thickness = _thickness(canvas.shape)
    classes, areas = np.unique(labels, return_counts=True)
    for k, area in sorted(zip(classes.tolist(), areas.tolist()), key=lambda ka: -ka[1]):
        if not 0 <= k < meta.num_classes or meta.classes[k] == _BACKGROUND:
            continue
        mask = labels == k
        _fill(canvas, mask, np.asarray(meta.palette[k], np.float32), alpha, thickness)
        if area >= _min_label_area(labels.shape):
            names += [(meta.classes[k], point, "mm")
                      for point in _label_points(mask, _min_label_area(labels.shape))]


def _draw_instances(canvas: np.ndarray, instances: dict[str, Any], meta: DatasetMeta,
                    score_thresh: float, alpha: float, names: list, boxes: list) -> None:
    scores = _numpy(instances["scores"]).astype(np.float64)
    keep = np.flatnonzero(scores >= score_thresh)
    keep = keep[np.argsort(scores[keep], kind="stable")]  # best last: drawn on top
    thing_meta = instance_meta(meta)
    masks, labels = instances["masks"], _numpy(instances["labels"])
    all_boxes = _numpy(instances["boxes"]).astype(np.float64)
    thickness = _thickness(canvas.shape)
    for rank, i in enumerate(keep.tolist()):
        label = int(labels[i])
        known = 0 <= label < thing_meta.num_classes
        colour = _shade(thing_meta.palette[label] if known else (255, 255, 255), rank)
        _fill(canvas, _numpy(masks[i]).astype(bool), colour, alpha, thickness)
        box = all_boxes[i].tolist()
        boxes.append((box, tuple(int(c) for c in colour)))
        name = thing_meta.classes[label] if known else str(label)
        names.append((f"{name} {scores[i]:.2f}", (box[0], box[1]), "lb"))


def _draw_panoptic(canvas: np.ndarray, ids: np.ndarray, segments: list[dict], meta: DatasetMeta,
                   alpha: float, names: list) -> None:
    thickness = _thickness(canvas.shape)
    per_class: dict[int, int] = {}
    present, counts = np.unique(ids, return_counts=True)
    areas = dict(zip(present.tolist(), counts.tolist()))
    for segment in sorted(segments, key=lambda s: -areas.get(int(s["id"]), 0)):
        mask = ids == int(segment["id"])
        k = int(segment["category_id"])
        known = 0 <= k < meta.num_classes
        colour = np.asarray(meta.palette[k] if known else (255, 255, 255), np.float32)
        if segment.get("isthing", known and k in meta.thing_ids):
            colour = _shade(colour, per_class.get(k, 0))
            per_class[k] = per_class.get(k, 0) + 1
        _fill(canvas, mask, colour, alpha, thickness)
        if areas[int(segment["id"])] >= _min_label_area(ids.shape):
            names += [(meta.classes[k] if known else str(k), point, "mm")
                      for point in _label_points(mask, _min_label_area(ids.shape))]


def _font(size: int) -> ImageFont.ImageFont:
    """The default font at `size`, loaded once per thread (FreeType faces are not shared across
    threads: overlays are drawn in the writer's threads)."""
    fonts = _fonts.__dict__.setdefault("by_size", {})
    if size not in fonts:
        try:
            fonts[size] = ImageFont.load_default(size=size)  # scalable (Pillow >= 10.1, FreeType)
        except TypeError:
            fonts[size] = ImageFont.load_default()
    return fonts[size]


def _annotate(picture: Image.Image, boxes: list, labels: list) -> None:
    """Boxes in their instance's colour; names in white with a black outline (readable on any
    colour), kept inside the picture."""
    draw = ImageDraw.Draw(picture)
    width, height = picture.size
    thickness = _thickness((height, width))
    size = _text_size((height, width))
    font = _font(size)
    stroke = max(1, size // 8)
    for (x0, y0, x1, y1), colour in boxes:
        draw.rectangle([x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)], outline=colour, width=thickness)
    for text, (x, y), anchor in labels:
        left, top, right, bottom = draw.textbbox((x, y), text, font=font, anchor=anchor,
                                                 stroke_width=stroke)
        if anchor == "lb" and top < 0:  # no room above the box: write inside it
            x, y, anchor = x, y + thickness, "lt"
            left, top, right, bottom = draw.textbbox((x, y), text, font=font, anchor=anchor,
                                                     stroke_width=stroke)
        dx = -min(left, 0) - max(right - width, 0)
        dy = -min(top, 0) - max(bottom - height, 0)
        draw.text((x + dx, y + dy), text, font=font, anchor=anchor, fill=(255, 255, 255),
                  stroke_width=stroke, stroke_fill=(0, 0, 0))
