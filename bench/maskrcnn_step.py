"""Seconds per Mask R-CNN training iteration: segtrain's Trainer against a bare torchvision step.

Issue 3's GPU figure: Mask R-CNN R50-FPN (model=maskrcnn's torchvision defaults, from scratch),
batch 4 of 800x1333 images with 8 instances each, fp32 / bf16 / fp16 autocast. Both loops use
the same model copy, batches (already on the device's side of the loader), AdamW and poly
schedule; rounds alternate, medians compared. Target on a GPU: ratio <= 1.05 and bf16 faster
than fp32. On a CPU use small sizes to check that it runs:

    python bench/maskrcnn_step.py --device cuda --precision bf16
    python bench/maskrcnn_step.py --device cpu --height 128 --width 160 --batch 2 --iters 3 --rounds 1
"""

from __future__ import annotations

import time
from typing import Any

import torch
from train_overhead import compare_with_bare, loop_arguments

from segtrain.engine.evaluation import autocast_context
from segtrain.engine.trainer import resolve_device
from segtrain.models.maskrcnn import build_maskrcnn
from segtrain.optim.schedulers import poly
from segtrain.tasks.instance import InstanceTask

CLASSES = 81


def make_batches(n: int, batch: int, height: int, width: int, objects: int,
                 collate: Any = None) -> list[dict]:
    """`n` batches of random images with `objects` box-shaped instances each, collated by
    `collate` (default: InstanceTask's)."""
    g = torch.Generator().manual_seed(0)
    collate = collate or InstanceTask(CLASSES).collate
    batches = []
    for _ in range(n):
        samples = []
        for i in range(batch):
            xy = torch.rand(objects, 2, generator=g) * torch.tensor([width * 0.7, height * 0.7])
            wh = (0.1 + 0.2 * torch.rand(objects, 2, generator=g)) * torch.tensor([width, height])
            boxes = torch.cat([xy, xy + wh], 1).floor()
            masks = torch.zeros(objects, height, width, dtype=torch.bool)
            for k, (x0, y0, x1, y1) in enumerate(boxes.long().tolist()):
                masks[k, y0:y1, x0:x1] = True
            target = {"boxes": boxes, "masks": masks, "iscrowd": torch.zeros(objects, dtype=torch.int64),
                      "labels": torch.randint(1, CLASSES, (objects,), generator=g), "image_id": i,
                      "orig_size": torch.tensor([height, width])}
            image = torch.randint(0, 256, (3, height, width), generator=g, dtype=torch.uint8)
            samples.append((image, target))
        batches.append(collate(samples))
    return batches


def bare_loop(model, task, batches, iters, device, precision) -> float:
    """torchvision's reference step: model(images, targets) -> summed losses -> backward -> step."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scheduler = poly(optimizer, total_iters=iters)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    model.train()
    start = time.perf_counter()
    for i in range(iters):
        batch = task.to_device(batches[i % len(batches)], device)
        optimizer.zero_grad(set_to_none=True)
        with autocast_context(device, precision):
            losses = model([image.float() / 255 for image in batch["images"]], batch["train_targets"])
        scaler.scale(sum(loss.float() for loss in losses.values())).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters


def main() -> None:
    parser = loop_arguments(__doc__.splitlines()[0], iters=20, rounds=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--height", type=int, default=800)
    parser.add_argument("--width", type=int, default=1333)
    args = parser.parse_args()

    device = resolve_device(args.device)
    torch.manual_seed(0)
    # min/max_size equal to the input: the model's own resize keeps 800x1333 as it is.
    reference = build_maskrcnn(CLASSES, min_size=min(args.height, args.width),
                               max_size=max(args.height, args.width)).to(device)
    task = InstanceTask(CLASSES)
    batches = make_batches(2, args.batch, args.height, args.width, objects=8)
    compare_with_bare(reference, task, batches, args, bare=bare_loop, warmup=2, lr=1e-4, target=1.05,
                      header=f"batch {args.batch}x3x{args.height}x{args.width}")

if __name__ == "__main__":
    main()
