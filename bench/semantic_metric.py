"""Seconds to accumulate semantic confusion matrices: SemanticEvaluator vs NumPy and torchmetrics.

200 int64 label maps of 512x1024 (19 classes, ~5% ignore pixels, blob-shaped regions with
prediction errors along their boundaries) are generated in memory before any timing. Timed in the
same run, over the same maps:

  segtrain      SemanticEvaluator.update on each map, then compute()
  numpy         the usual recipe: mask ignore, np.bincount(C * gt + pred) (zero-copy views)
  torchmetrics  torchmetrics MulticlassJaccardIndex(19, ignore_index=255, average=None)
  tm-novalidate the same with validate_args=False

segtrain and numpy take the best of --repeat rounds, torchmetrics one round (it is slow). All
must give the same per-class IoU. PASS needs torchmetrics/segtrain >= 5 and numpy/segtrain >= 1.

    python bench/semantic_metric.py [--num 200] [--height 512] [--width 1024] [--device cpu]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from segtrain.metrics.semantic import SemanticEvaluator

CLASSES, IGNORE = 19, 255


def make_maps(n: int, height: int, width: int, seed: int = 0) -> list[tuple[torch.Tensor, ...]]:
    """(gt, pred) int64 (H, W) pairs: smooth random class fields, pred a perturbed copy."""
    g = torch.Generator().manual_seed(seed)
    prior = torch.linspace(2.0, 0.0, CLASSES).view(1, CLASSES, 1, 1)  # imbalanced, like real data
    cells = (height // 8, width // 8)
    maps = []
    for _ in range(n):
        logits = torch.randn(1, CLASSES, height // 64, width // 64, generator=g) + prior
        noisy = logits + 0.4 * torch.randn(logits.shape, generator=g)
        fields = F.interpolate(torch.cat([logits, noisy]), size=cells, mode="bilinear")
        labels = fields.argmax(dim=1)
        ignore = torch.rand(cells, generator=g) < 0.05
        gt = labels[0].masked_fill(ignore, IGNORE)
        gt = gt.repeat_interleave(8, 0).repeat_interleave(8, 1).contiguous()
        pred = labels[1].repeat_interleave(8, 0).repeat_interleave(8, 1)
        flips = torch.rand(height, width, generator=g) < 0.02
        pred = torch.where(flips, torch.randint(0, CLASSES, (height, width), generator=g), pred)
        maps.append((gt, pred.contiguous()))
    return maps


def iou_from_confusion(cm: np.ndarray) -> np.ndarray:
    tp = np.diag(cm).astype(np.float64)
    union = cm.sum(0) + cm.sum(1) - tp
    return 100 * tp / np.maximum(union, 1)


def run_segtrain(maps, device: str) -> np.ndarray:
    evaluator = SemanticEvaluator(CLASSES, IGNORE, device=device)
    for gt, pred in maps:
        evaluator.update(pred, gt)
    per_class = evaluator.compute()["semantic"]["per_class"]
    return np.array([per_class[str(c)]["IoU"] for c in range(CLASSES)])


def run_numpy(maps, device: str) -> np.ndarray:
    cm = np.zeros(CLASSES * CLASSES, dtype=np.int64)
    for gt, pred in maps:
        gt_np, pred_np = gt.numpy().ravel(), pred.numpy().ravel()
        valid = gt_np != IGNORE
        cm += np.bincount(CLASSES * gt_np[valid] + pred_np[valid], minlength=CLASSES * CLASSES)
    return iou_from_confusion(cm.reshape(CLASSES, CLASSES))


def torchmetrics_runner(validate: bool) -> Callable:
    def run(maps, device: str) -> np.ndarray:
        from torchmetrics.classification import MulticlassJaccardIndex

        metric = MulticlassJaccardIndex(
            CLASSES, ignore_index=IGNORE, average=None, validate_args=validate
        ).to(device)
        for gt, pred in maps:
            metric.update(pred, gt)
        return 100 * metric.compute().double().cpu().numpy()

    return run


def timed(fn: Callable, maps, device: str) -> tuple[float, np.ndarray]:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn(maps, device)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num", type=int, default=200)
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=3, help="rounds for segtrain and numpy")
    parser.add_argument("--device", default="cpu", help="where segtrain/torchmetrics count")
    args = parser.parse_args()

    start = time.perf_counter()
    maps = make_maps(args.num, args.height, args.width)
    pixels = args.num * args.height * args.width
    ignored = sum(int((gt == IGNORE).sum()) for gt, _ in maps) / pixels
    print(f"{args.num} maps {args.height}x{args.width}, {CLASSES} classes, {100 * ignored:.1f}% "
          f"ignore, generated in {time.perf_counter() - start:.1f} s; torch threads "
          f"{torch.get_num_threads()}, device {args.device}")
    device_maps = [(gt.to(args.device), pred.to(args.device)) for gt, pred in maps]

    runners: dict[str, tuple[Callable, list, int]] = {
        "segtrain": (run_segtrain, device_maps, args.repeat),
        "numpy": (run_numpy, maps, args.repeat),
    }
    try:
        import torchmetrics  # noqa: F401
    except ImportError:
        print("torchmetrics is not installed: skipping the torchmetrics comparison")
    else:
        runners["torchmetrics"] = (torchmetrics_runner(True), device_maps, 1)
        runners["tm-novalidate"] = (torchmetrics_runner(False), device_maps, 1)

    seconds: dict[str, float] = {}
    ious: dict[str, np.ndarray] = {}
    for round_ in range(args.repeat):  # rounds interleave the methods so noise hits all alike
        for name, (fn, data, rounds) in runners.items():
            if round_ < rounds:
                elapsed, ious[name] = timed(fn, data, args.device if data is device_maps else "cpu")
                seconds[name] = min(seconds.get(name, float("inf")), elapsed)

    agree = all(np.allclose(iou, ious["numpy"], atol=1e-3, rtol=0) for iou in ious.values())
    for name, value in seconds.items():
        worst = float(np.abs(ious[name] - ious["numpy"]).max())
        print(f"{name:14s} {value:7.3f} s   max |IoU - numpy| {worst:.2e}")
    base = seconds["segtrain"]
    ratios = {f"{name}/segtrain": t / base for name, t in seconds.items() if name != "segtrain"}
    print("  ".join(f"{name} {ratio:.2f}x" for name, ratio in ratios.items()))
    passed = agree and ratios["numpy/segtrain"] >= 1.0
    if "torchmetrics/segtrain" in ratios:
        passed = passed and ratios["torchmetrics/segtrain"] >= 5.0
    if not agree:
        print("per-class IoUs disagree between implementations")
    print("PASS" if passed else "FAIL")


if __name__ == "__main__":
    main()
