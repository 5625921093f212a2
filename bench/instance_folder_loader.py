"""Instance samples per second: dataset=instance_folder against the COCO-JSON path on the same data.

One synthetic set is written to a temporary folder first (not timed): PNG images, --objects
discs each (dense small objects, later ones occluding earlier), stored three ways over the same
image files:

  coco          images/ + instances.json, compressed RLE per object (COCOInstanceDataset)
  instance_map  images/ + instances/<stem>.png, one id map per image (8-bit, 16-bit past 255)
  per_object    images/ + masks/<stem>/<k>.png, one binary PNG per object (Data Science Bowl style)

All three yield the same masks and boxes (checked on the first images). Each round times every
reader over all images with the same loader workers; rounds alternate, medians are compared.
Torch runs --threads threads (default 1, as in a DataLoader worker). Target: instance_map/coco
>= 1.0 (no regression against the JSON path); per_object is reported (one PNG decode per object
is the layout's own cost).

    python bench/instance_folder_loader.py [--images 100] [--objects 100] [--size 512]
                                           [--workers 0] [--rounds 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from torch.utils.data import DataLoader

from segtrain.data.datasets.coco import COCOInstanceDataset
from segtrain.data.datasets.instance_folder import InstanceFolderDataset, list_samples


def write_dataset(root: Path, images: int, objects: int, size: int) -> Path:
    """The three stores of one synthetic set (see the module docstring); returns the JSON path."""
    rng = np.random.default_rng(0)
    for folder in ("images", "instances", "masks"):
        (root / folder).mkdir(parents=True)
    entries, annotations = [], []
    ys, xs = np.mgrid[0:size, 0:size]
    for i in range(1, images + 1):
        stem = f"{i:06d}"
        base = np.stack([(xs * rng.uniform(0.1, 0.5)) % 256, (ys * rng.uniform(0.1, 0.5)) % 256,
                         ((xs + ys) * rng.uniform(0.1, 0.3)) % 256], -1)
        pixels = np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / "images" / f"{stem}.png")
        ids = np.zeros((size, size), np.uint16 if objects > 255 else np.uint8)
        for k in range(1, objects + 1):
            cy, cx = rng.uniform(0, size, 2)
            radius = rng.uniform(0.01, 0.04) * size
            ids[(ys - cy) ** 2 + (xs - cx) ** 2 < radius ** 2] = k
        Image.fromarray(ids).save(root / "instances" / f"{stem}.png")
        present = [k for k in np.unique(ids).tolist() if k]
        masks = ids[None] == np.array(present, dtype=ids.dtype)[:, None, None]
        (root / "masks" / stem).mkdir()
        for k, mask in zip(present, masks):
            Image.fromarray(mask.astype(np.uint8) * 255).save(root / "masks" / stem / f"{k:04d}.png")
        rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
        entries.append({"id": i, "file_name": f"{stem}.png", "height": size, "width": size})
        for rle in rles:
            x, y, w, h = mask_utils.toBbox(rle).tolist()
            annotations.append({
                "id": len(annotations) + 1, "image_id": i, "category_id": 1, "iscrowd": 0,
                "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")},
                "bbox": [x, y, w, h], "area": float(mask_utils.area(rle)),
            })
    ann_file = root / "instances.json"
    ann_file.write_text(json.dumps({"images": entries, "annotations": annotations,
                                    "categories": [{"id": 1, "name": "object"}]}))
    return ann_file


def samples_per_second(dataset, workers: int) -> float:
    loader = DataLoader(dataset, batch_size=1, num_workers=workers, collate_fn=lambda batch: batch)
    start = time.perf_counter()
    count = sum(len(batch) for batch in loader)
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--objects", type=int, default=100)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ann_file = write_dataset(root, args.images, args.objects, args.size)
        readers = {"coco": COCOInstanceDataset(ann_file=ann_file, img_dir=root / "images", train=False)}
        for name in ("instance_map", "per_object"):
            readers[name] = InstanceFolderDataset(root, "train", layout=name)
            readers[name].samples = list_samples(root, name)  # every image, not a train share
        objects = 0
        for i in range(3):  # same images, same masks and boxes
            _, want = readers["coco"][i]
            objects += len(want["masks"])
            for name in ("instance_map", "per_object"):
                _, got = readers[name][i]
                assert torch.equal(got["masks"], want["masks"]), f"{name}: masks differ on image {i}"
                assert torch.equal(got["boxes"], want["boxes"]), f"{name}: boxes differ on image {i}"
        rates: dict[str, list[float]] = {name: [] for name in readers}
        for _ in range(args.rounds):
            for name, dataset in readers.items():
                rates[name].append(samples_per_second(dataset, args.workers))
    median = {name: statistics.median(r) for name, r in rates.items()}
    print(f"{args.images} PNG images {args.size}x{args.size}, {args.objects} discs drawn each "
          f"(~{objects / 3:.0f} visible), {args.workers} workers, {args.rounds} rounds, "
          f"torch threads {torch.get_num_threads()}")
    for name, rate in median.items():
        print(f"{name:<13} {rate:7.1f} samples/s  (rounds: {', '.join(f'{x:.1f}' for x in rates[name])})")
    ratio = median["instance_map"] / median["coco"]
    print(f"instance_map/coco = {ratio:.2f} (target >= 1.0): {'PASS' if ratio >= 1.0 else 'FAIL'}")
    print(f"per_object/coco   = {median['per_object'] / median['coco']:.2f} (one PNG per object)")


if __name__ == "__main__":
    main()
