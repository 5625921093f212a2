"""COCO instance samples per second: COCOInstanceDataset against torchvision's reference pipeline.

A synthetic COCO dataset is written to a temporary folder first (PNG images by default, as the
synthetic COCO writer saves them, or --format jpg; --objects polygon annotations each, since the
reference's conversion handles polygons only), not timed. Then, in the same
run, over the same files and with the same number of loader workers:

  segtrain   COCOInstanceDataset: torchvision.io decode, cached annotation index, polygons
             rasterised by pycocotools in one call per image, runs expanded by one np.repeat
  reference  what torchvision's references/detection does: datasets.CocoDetection (PIL decode,
             pycocotools COCO index) + its ConvertCocoPolysToMask step (frPyObjects per object)

Both yield the same masks (checked on the first images). Rounds alternate; medians compared.
Torch runs --threads threads (default 1, as in every DataLoader worker process): with more,
the reference's per-object torch reductions wait on each other's threads whenever the machine
is busy, and its rate, so the ratio, swings with the load rather than with the code.
Target: segtrain/reference >= 1.5.

    python bench/instance_loader.py [--images 200] [--workers 0] [--rounds 3] [--format png|jpg]
                                    [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from torch.utils.data import DataLoader
from torchvision.datasets import CocoDetection

from segtrain.data.datasets.coco import COCOInstanceDataset


def write_dataset(root: Path, images: int, objects: int, size: tuple[int, int], fmt: str = "png") -> Path:
    """Images (PNG, as segtrain's synthetic COCO writer saves them, or JPEG) and an instances JSON
    with polygon annotations."""
    rng = np.random.default_rng(0)
    height, width = size
    (root / "val2017").mkdir(parents=True)
    entries, annotations = [], []
    for i in range(1, images + 1):
        # Smooth gradients plus noise: compresses like a photo, not like pure noise.
        ys, xs = np.mgrid[0:height, 0:width]
        base = np.stack([(xs * rng.uniform(0.1, 0.5)) % 256, (ys * rng.uniform(0.1, 0.5)) % 256,
                         ((xs + ys) * rng.uniform(0.1, 0.3)) % 256], -1)
        pixels = np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)
        name = f"{i:012d}.{fmt}"
        Image.fromarray(pixels).save(root / "val2017" / name, **({"quality": 90} if fmt == "jpg" else {}))
        entries.append({"id": i, "file_name": name, "height": height, "width": width})
        for j in range(objects):
            cx, cy = rng.uniform(0.1, 0.9) * width, rng.uniform(0.1, 0.9) * height
            radius = rng.uniform(0.05, 0.2) * min(height, width)
            angles = np.sort(rng.uniform(0, 2 * math.pi, 12))
            poly = np.stack([cx + radius * np.cos(angles), cy + radius * np.sin(angles)], 1)
            poly = np.clip(poly, 0, [width - 1, height - 1])
            x0, y0 = poly.min(0)
            x1, y1 = poly.max(0)
            annotations.append({
                "id": len(annotations) + 1, "image_id": i, "category_id": 1 + j % 3,
                "segmentation": [poly.ravel().round(2).tolist()], "bbox": [x0, y0, x1 - x0, y1 - y0],
                "area": float((x1 - x0) * (y1 - y0)), "iscrowd": 0,
            })
    categories = [{"id": k, "name": f"c{k}"} for k in (1, 2, 3)]
    ann_file = root / "annotations" / "instances_val2017.json"
    ann_file.parent.mkdir()
    ann_file.write_text(json.dumps({"images": entries, "annotations": annotations, "categories": categories}))
    return ann_file


class ConvertCocoPolysToMask:
    """The target conversion of torchvision's references/detection/coco_utils.py (same logic)."""

    def __call__(self, image: Image.Image, anns: list[dict]) -> tuple[torch.Tensor, dict]:
        width, height = image.size
        anns = [a for a in anns if a.get("iscrowd", 0) == 0]
        boxes = torch.as_tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        boxes[:, 0::2].clamp_(min=0, max=width)
        boxes[:, 1::2].clamp_(min=0, max=height)
        masks = []
        for a in anns:
            rles = mask_utils.frPyObjects(a["segmentation"], height, width)
            mask = mask_utils.decode(rles)
            if mask.ndim < 3:
                mask = mask[..., None]
            masks.append(torch.as_tensor(mask, dtype=torch.uint8).any(dim=2))
        masks = torch.stack(masks) if masks else torch.zeros((0, height, width), dtype=torch.uint8)
        keep = (boxes[:, 3] > boxes[:, 1]) & (boxes[:, 2] > boxes[:, 0])
        target = {"boxes": boxes[keep], "labels": torch.tensor([a["category_id"] for a in anns])[keep],
                  "masks": masks[keep]}
        return torch.as_tensor(np.asarray(image)).permute(2, 0, 1), target


class ReferenceDataset(CocoDetection):
    def __init__(self, img_dir: Path, ann_file: Path) -> None:
        super().__init__(str(img_dir), str(ann_file))
        self.convert = ConvertCocoPolysToMask()

    def __getitem__(self, index: int):
        image, anns = super().__getitem__(index)
        return self.convert(image, anns)


def samples_per_second(dataset, workers: int) -> float:
    loader = DataLoader(dataset, batch_size=1, num_workers=workers, collate_fn=lambda batch: batch)
    start = time.perf_counter()
    count = sum(len(batch) for batch in loader)
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--objects", type=int, default=7)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--format", default="png", choices=["png", "jpg"])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ann_file = write_dataset(root, args.images, args.objects, (args.height, args.width), args.format)
        ours = COCOInstanceDataset(root, split="val", train=False)
        reference = ReferenceDataset(root / "val2017", ann_file)
        for i in range(3):  # same images, same masks
            (image, target), (ref_image, ref_target) = ours[i], reference[i]
            assert torch.equal(target["masks"], ref_target["masks"].bool()), f"masks differ on image {i}"
            assert image.shape == ref_image.shape
        fast, slow = [], []
        for _ in range(args.rounds):
            fast.append(samples_per_second(ours, args.workers))
            slow.append(samples_per_second(reference, args.workers))
    f, s = statistics.median(fast), statistics.median(slow)
    print(f"{args.images} {args.format.upper()} images {args.width}x{args.height}, "
          f"{args.objects} objects each, {args.workers} workers, {args.rounds} rounds, "
          f"torch threads {torch.get_num_threads()}")
    print(f"segtrain   {f:7.1f} samples/s  (rounds: {', '.join(f'{x:.1f}' for x in fast)})")
    print(f"reference  {s:7.1f} samples/s  (rounds: {', '.join(f'{x:.1f}' for x in slow)})")
    ratio = f / s
    print(f"segtrain/reference = {ratio:.2f} (target >= 1.5): {'PASS' if ratio >= 1.5 else 'FAIL'}")


if __name__ == "__main__":
    main()
