"""Writing a dataset to disk as image and label PNG folders (the layout `segtrain score` reads)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from segtrain.data.codecs.image_io import write_label
from segtrain.data.meta import DatasetMeta

# VOC's colour for void pixels in its palette PNGs.
_VOID_COLOUR = (224, 224, 192)


def export_semantic(dataset: Dataset, out_dir: str | os.PathLike) -> list[str]:
    """Write every item as `out_dir/images/{stem}.png` and `out_dir/labels/{stem}.png`.

    stem = f"{image_id:06d}". Labels are palette PNGs of the `semantic` map (class indices,
    `ignore_index` kept) coloured with `dataset.meta.palette` when the dataset has one. Returns
    the stems in dataset order.
    """
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    (out_dir / "labels").mkdir(parents=True, exist_ok=True)
    palette = label_palette(getattr(dataset, "meta", None))
    stems = []
    for index in range(len(dataset)):
        image, target = dataset[index]
        stem = f"{int(target['image_id']):06d}"
        pixels = torch.as_tensor(image).permute(1, 2, 0).contiguous().numpy()
        Image.fromarray(pixels).save(out_dir / "images" / f"{stem}.png")
        write_label(out_dir / "labels" / f"{stem}.png", target["semantic"], palette)
        stems.append(stem)
    return stems


def label_palette(meta: DatasetMeta | None) -> list[tuple[int, int, int]] | None:
    """The colours of a label PNG: the classes' palette, VOC's void colour at `ignore_index`."""
    if meta is None:
        return None
    palette = list(meta.palette)[:256]
    if len(palette) <= meta.ignore_index < 256:
        palette += [(0, 0, 0)] * (meta.ignore_index - len(palette)) + [_VOID_COLOUR]
    return palette


def items_with_unique_ids(dataset: Dataset, writer: str) -> Iterator[tuple[int, Any, dict, int]]:
    """(index, image, target, image_id) of every item; ValueError naming `writer` and the item
    when an image_id repeats (the formats key everything by it)."""
    seen: set[int] = set()
    for index in range(len(dataset)):
        image, target = dataset[index]
        image_id = int(target["image_id"])
        if image_id in seen:
            raise ValueError(f"{writer}: item {index} repeats image_id {image_id}")
        seen.add(image_id)
        yield index, image, target, image_id
