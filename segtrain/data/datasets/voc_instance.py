"""PASCAL VOC 2012 instance segmentation, read from VOCdevkit's SegmentationObject + SegmentationClass."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torchvision import tv_tensors

from segtrain.data.codecs.image_io import read_image, read_label
from segtrain.data.datasets.layout import check_same_size
from segtrain.data.datasets.panoptic import masks_to_boxes
from segtrain.data.datasets.voc import (
    IGNORE_INDEX,
    VOC_CLASSES,
    VOCSegmentation,
    check_class_values,
    voc_meta,
)
from segtrain.data.meta import DatasetMeta


def voc_instance_meta() -> DatasetMeta:
    """VOC's 21 classes and palette, the 20 object classes 1..20 as things and background as
    stuff (as the COCO loaders build it), so instance label k is VOC class k."""
    return replace(voc_meta(), thing_ids=list(range(1, len(VOC_CLASSES))), stuff_ids=[0])


class VOCInstanceSegmentation(VOCSegmentation):
    """PASCAL VOC 2012 instance segmentation in its official layout (train 1,464, val 1,449).

    Reads what `VOCSegmentation` reads plus `SegmentationObject/<name>.png`: a palette PNG whose
    indices 1..N are the image's objects, 0 background and 255 the void outline. An object's
    class is the `SegmentationClass` value under its pixels; an object whose pixels carry more
    than one class, or background/void, is a ValueError naming both files and the object id.

    The 255 outline is "don't care" (the VOC devkit's void): it belongs to no object's mask and
    stays 255 in `semantic`, as VOC-instance conversions for MMDetection/detectron2 treat it. It
    is not made a crowd region: COCO evaluation then scores predicted pixels on it as false
    positives, slightly stricter than the SDS protocol, which leaves void pixels out of the IoU.

    Returns `(image, target)`: image `tv_tensors.Image` uint8 (3, H, W); target dict with
    `masks` Mask bool (N, H, W) one per object id in increasing id order, `labels` int64 (N,) in
    1..20 (1 + index into `meta.thing_ids` = the VOC class), `boxes` BoundingBoxes XYXY float32
    (N, 4) of the mask pixels (x2, y2 exclusive), `iscrowd` int64 zeros (N,), `semantic` Mask
    int64 (H, W) of VOC classes 0..20 or 255, `image_id` int (the item index), `orig_size` int64
    [H, W], `file_name` str (the image's stem). `transforms(image, target)` is applied last.
    """

    extra_ann_dirs = ("SegmentationObject",)

    def __init__(
        self, root: str | os.PathLike | None, split: str = "train", transforms: Callable | None = None
    ) -> None:
        super().__init__(root, split, transforms)
        self.meta = voc_instance_meta()

    def __getitem__(self, index: int) -> tuple[tv_tensors.Image, dict[str, Any]]:
        stem, image_path, class_path, object_path = self._records[int(index)]
        image, classes, objects = read_image(image_path), read_label(class_path), read_label(object_path)
        check_same_size(image, classes, image_path, class_path)
        check_same_size(image, objects, image_path, object_path)
        check_class_values(classes, class_path)
        ids, labels = object_classes(objects, classes, object_path, class_path)
        masks = objects.unsqueeze(0) == ids.view(-1, 1, 1)  # void outline (255) is in no mask
        height, width = objects.shape
        boxes = masks_to_boxes(masks)
        target = {
            "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(height, width)),
            "masks": tv_tensors.Mask(masks),
            "labels": labels,
            "iscrowd": torch.zeros(len(labels), dtype=torch.int64),
            "semantic": tv_tensors.Mask(classes),
            "image_id": int(index),
            "orig_size": torch.tensor([height, width], dtype=torch.int64),
            "file_name": stem,
        }
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target


def object_classes(
    objects: torch.Tensor, classes: torch.Tensor, object_path: Path, class_path: Path
) -> tuple[torch.Tensor, torch.Tensor]:
    """(object ids, their classes), int64 (N,) each, ids increasing, of an int64 (H, W) object
    map (0 = background, 255 = void) and its class map (0..20, 255 = void).

    ValueError naming both files and the object id when an object's pixels carry more than one
    class, or background (0) or void (255) ones.
    """
    on_object = (objects != 0) & (objects != IGNORE_INDEX)
    # Each distinct (object, class) pair once; a consistent object has exactly one pair.
    pairs = torch.unique(objects[on_object] * 256 + classes[on_object])
    ids, labels = pairs // 256, pairs % 256
    for object_id in ids.unique().tolist():
        seen = labels[ids == object_id].tolist()
        if len(seen) > 1 or seen[0] in (0, IGNORE_INDEX):
            names = ", ".join(f"{c} ({VOC_CLASSES[c] if c < len(VOC_CLASSES) else 'void'})" for c in seen)
            raise ValueError(
                f"{object_path}: object {object_id} covers pixels of classes {names} in {class_path}; "
                "expected every pixel of an object to carry its one object class (1..20)"
            )
    return ids, labels
