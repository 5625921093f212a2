"""`loss.class_weights=auto` against uniform weights on a synthetic set with one rare class.

The synthetic shapes are drawn with `kind_weights` so that the last kind (triangle) covers ~1% of
the pixels (the others 4-7%, background ~79%), in training and validation alike. The demo's
U-Net recipe (experiment=synthetic_unet) trains twice from the same seed: with uniform weights
(the baseline, in the same run) and with the given class weights; printed: the rare class's IoU,
the mIoU, and their differences.

    python bench/class_weights.py                      # 1300 iterations each (the demo's)
    python bench/class_weights.py --iters 20 --dry-run # that it runs
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

KIND_WEIGHTS = "[1,1,1,1,0.3]"  # triangle at ~1% of pixels (measured: 0.95%)
RARE = "triangle"


def train(run_dir: Path, iters: int, class_weights: str, extra: list[str]) -> tuple[dict, float]:
    """Train one run; returns (metrics.json's semantic family, seconds)."""
    overrides = ["experiment=synthetic_unet", f"trainer.max_iters={iters}",
                 f"trainer.eval_every={iters}", f"trainer.ckpt_every={iters}",
                 f"dataset.train.kind_weights={KIND_WEIGHTS}",  # dataset.val follows it
                 f"loss.class_weights={class_weights}", f"hydra.run.dir={run_dir}", *extra]
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "segtrain", "train", *overrides], check=True,
                   stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    return json.loads((run_dir / "metrics.json").read_text())["semantic"], seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=1300)
    parser.add_argument("--weights", default="auto", help="auto | median_frequency | inverse")
    parser.add_argument("--out", default=None, help="keep the run directories here")
    parser.add_argument("--dry-run", action="store_true", help="16 val images, no warmup: that it runs")
    args = parser.parse_args()
    extra = ["dataset.val.num_samples=16", "scheduler.warmup_iters=0"] if args.dry_run else []
    root = Path(args.out or tempfile.mkdtemp(prefix="class_weights_"))
    print(f"{args.iters} iterations per run, load average {os.getloadavg()[0]:.1f}, runs in {root}")
    rows = []
    for weights in ("null", args.weights):
        metrics, seconds = train(root / weights, args.iters, weights, extra)
        rows.append((weights, metrics["per_class"][RARE]["IoU"], metrics["mIoU"], seconds))
    print(f"\n{'class_weights':<16}{RARE + ' IoU':>14}{'mIoU':>8}{'seconds':>9}")
    for weights, rare, miou, seconds in rows:
        print(f"{weights:<16}{rare:>14.2f}{miou:>8.2f}{seconds:>9.0f}")
    (_, base_rare, base_miou, _), (_, rare, miou, _) = rows
    print(f"\n{args.weights} - uniform: {RARE} IoU {rare - base_rare:+.2f}, mIoU {miou - base_miou:+.2f}")


if __name__ == "__main__":
    main()
