"""Writing a dataset with instance targets to disk as a COCO dataset (images + instances JSON)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from torch.utils.data import Dataset

from segtrain.data.export.semantic import items_with_unique_ids


def write_coco_instances(dataset: Dataset, out_dir: str | os.PathLike, split: str = "val") -> Path:
    """Save every item as a COCO 2017-style dataset; returns the annotation file's path.

    Writes `out_dir/{split}2017/{image_id:012d}.png` and
    `out_dir/annotations/instances_{split}2017.json`, the layout `COCOInstanceDataset` reads.
    Items need `masks` bool (N, H, W), `boxes` XYXY (N, 4), `labels` (N,) contiguous ids,
    `image_id` (unique ints) and optionally `iscrowd`. Categories are `dataset.meta`'s thing
    classes (background left out) under their dataset ids (`meta.category_id`). Segmentations
    are compressed RLE (counts as str), `bbox` is [x, y, w, h] and `area` the mask's pixel count.
    """
    out_dir = Path(out_dir)
    image_dir, ann_path = out_dir / f"{split}2017", out_dir / "annotations" / f"instances_{split}2017.json"
    image_dir.mkdir(parents=True, exist_ok=True)
    ann_path.parent.mkdir(parents=True, exist_ok=True)
    meta = dataset.meta
    things = [k for k in (meta.thing_ids or range(1, meta.num_classes)) if k != 0]
    categories = [
        {"id": meta.category_id(k), "name": meta.classes[k], "supercategory": "object"} for k in things
    ]
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for _, image, target, image_id in items_with_unique_ids(dataset, "write_coco_instances"):
        height, width = image.shape[-2:]
        file_name = f"{image_id:012d}.png"
        pixels = torch.as_tensor(image).permute(1, 2, 0).contiguous().numpy()
        Image.fromarray(pixels).save(image_dir / file_name)
        images.append({"id": image_id, "file_name": file_name, "height": int(height), "width": int(width)})
        # Ids start at 1: COCOeval stores matched gt ids with 0 meaning "unmatched".
        annotations += _annotations(meta, target, image_id, first_id=len(annotations) + 1)
    data = {
        "info": {"description": f"written by segtrain from {type(dataset).__name__}"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }
    with open(ann_path, "w", encoding="utf-8") as f:
        json.dump(data, f)
    return ann_path


def _annotations(meta: Any, target: dict[str, Any], image_id: int, first_id: int) -> list[dict[str, Any]]:
    masks = torch.as_tensor(target["masks"]).bool()
    if not len(masks):
        return []
    # pycocotools encodes uint8 (H, W, N) in Fortran order, all masks in one call.
    rles = mask_utils.encode(np.asfortranarray(masks.permute(1, 2, 0).numpy().astype(np.uint8)))
    areas = mask_utils.area(rles)
    boxes = torch.as_tensor(target["boxes"]).tolist()
    labels = torch.as_tensor(target["labels"]).tolist()
    iscrowd = torch.as_tensor(target.get("iscrowd", torch.zeros(len(labels)))).tolist()
    out = []
    for j, (rle, (x1, y1, x2, y2)) in enumerate(zip(rles, boxes)):
        out.append({
            "id": first_id + j,
            "image_id": image_id,
            "category_id": meta.category_id(int(labels[j])),
            "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")},
            "area": float(areas[j]),
            "bbox": [x1, y1, x2 - x1, y2 - y1],
            "iscrowd": int(iscrowd[j]),
        })
    return out
