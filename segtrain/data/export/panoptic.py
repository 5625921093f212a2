"""Writing a dataset with panoptic targets to disk in the official COCO panoptic layout."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from segtrain.data.datasets.panoptic import id_to_rgb, masks_to_boxes, segment_index
from segtrain.data.export.semantic import items_with_unique_ids
from segtrain.data.meta import DatasetMeta


def write_coco_panoptic(dataset: Dataset, out_dir: str | os.PathLike, split: str = "val") -> Path:
    """Save every item as COCO 2017 panoptic ground truth; returns the JSON's path.

    Writes, the layout `COCOPanopticDataset(root=out_dir, split=split)` reads:
        out_dir/annotations/panoptic_{split}2017.json
        out_dir/annotations/panoptic_{split}2017/{stem}.png   (RGB ids: id = R + 256 G + 256^2 B)
        out_dir/{split}2017/{stem}.png                        (the image, lossless)
    stem = the target's `file_name` when it has one, else f"{image_id:012d}". Items need
    `panoptic` int (H, W) ids < 256^3 (0 = VOID), `segments` {"ids", "classes", "iscrowd"}
    and a unique int `image_id`. `segments_info` keeps the items' segment order, with `bbox`
    [x, y, w, h] and `area` (pixel count) measured on the map; categories are all of
    `dataset.meta`'s classes under `meta.category_id`, with `isthing` and the palette colour.
    """
    out_dir = Path(out_dir)
    ann_path = out_dir / "annotations" / f"panoptic_{split}2017.json"
    png_dir, image_dir = ann_path.with_suffix(""), out_dir / f"{split}2017"
    png_dir.mkdir(parents=True, exist_ok=True)
    image_dir.mkdir(parents=True, exist_ok=True)
    meta: DatasetMeta = dataset.meta
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for index, image, target, image_id in items_with_unique_ids(dataset, "write_coco_panoptic"):
        stem = str(target.get("file_name") or f"{image_id:012d}")
        panoptic = torch.as_tensor(target["panoptic"]).to(torch.int64)
        if panoptic.numel() and not 0 <= int(panoptic.min()) <= int(panoptic.max()) < 256**3:
            raise ValueError(f"write_coco_panoptic: item {index} has segment ids outside [0, 256^3)")
        height, width = panoptic.shape
        _save_png(image_dir / f"{stem}.png", torch.as_tensor(image))
        _save_png(png_dir / f"{stem}.png", id_to_rgb(panoptic))
        images.append({"id": image_id, "file_name": f"{stem}.png", "height": height, "width": width})
        annotations.append({
            "image_id": image_id,
            "file_name": f"{stem}.png",
            "segments_info": _segments_info(meta, panoptic, target["segments"], f"item {index}"),
        })
    data = {
        "info": {"description": f"written by segtrain from {type(dataset).__name__}"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [
            {
                "id": meta.category_id(k),
                "name": name,
                "supercategory": "thing" if k in meta.thing_ids else "stuff",
                "isthing": int(k in meta.thing_ids),
                "color": list(meta.palette[k]),
            }
            for k, name in enumerate(meta.classes)
        ],
    }
    with open(ann_path, "w", encoding="utf-8") as f:
        json.dump(data, f)
    return ann_path


def _segments_info(
    meta: DatasetMeta, panoptic: torch.Tensor, segments: dict[str, torch.Tensor], source: str
) -> list[dict[str, Any]]:
    ids = torch.as_tensor(segments["ids"]).to(torch.int64)
    index = segment_index(panoptic, ids, f"write_coco_panoptic: {source}")
    masks = index.unsqueeze(0) == torch.arange(len(ids)).view(-1, 1, 1)
    areas = masks.flatten(1).sum(1).tolist()
    boxes = masks_to_boxes(masks).int().tolist()
    classes = torch.as_tensor(segments["classes"]).tolist()
    iscrowd = torch.as_tensor(segments["iscrowd"]).tolist()
    return [
        {
            "id": int(ids[j]),
            "category_id": meta.category_id(int(classes[j])),
            "iscrowd": int(iscrowd[j]),
            "bbox": [x1, y1, x2 - x1, y2 - y1],
            "area": int(areas[j]),
        }
        for j, (x1, y1, x2, y2) in enumerate(boxes)
    ]


def _save_png(path: Path, chw: torch.Tensor) -> None:
    Image.fromarray(chw.to(torch.uint8).permute(1, 2, 0).contiguous().numpy()).save(path)
