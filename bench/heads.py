"""Each semantic head at the same budget on the built-in synthetic shapes: mIoU and time.

Every head trains from scratch on the same backbone (timm's ResNet-18, so that the dilated heads
can dilate it) with the same optimizer, schedule, batch, iterations and data, through the CLI as
a user would; the table gives the final val mIoU, the seconds per iteration, and both as a ratio
against the project's small U-Net (the demo model) trained in the same run. SegFormer-B0 (its
own MiT-B0 encoder) is listed as well.

    python bench/heads.py                      # 300 iterations each, 128-px images (CPU: ~30 min)
    python bench/heads.py --iters 20 --val 16  # a smoke run
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BACKBONE = "timm:resnet18"
RUNS = {  # label -> model overrides
    "U-Net (baseline, own encoder)": ["model=unet", "model.base_channels=8"],
    "FCN (OS 8)": ["model=fcn", f"model.backbone={BACKBONE}", "model.output_stride=8"],
    "PSPNet (OS 8)": ["model=pspnet", f"model.backbone={BACKBONE}", "model.output_stride=8"],
    "DeepLabV3+ (OS 8)": ["model=deeplabv3plus", f"model.backbone={BACKBONE}", "model.output_stride=8"],
    "UPerNet (OS 32)": ["model=upernet", f"model.backbone={BACKBONE}"],
    "SegFormer head (OS 32)": ["model=segformer", f"model.backbone={BACKBONE}"],
    "Res-U-Net (OS 32)": ["model=unet", f"model.backbone={BACKBONE}"],
    "SegFormer-B0 (MiT-B0)": ["model=segformer", "model.backbone=mit_b0"],
}


def train(work: Path, label: str, overrides: list[str], args: argparse.Namespace) -> dict:
    run_dir = work / str(list(RUNS).index(label))
    warmup = min(30, args.iters // 4)
    command = [sys.executable, "-m", "segtrain", "train", "dataset=synthetic", *overrides,
               "optimizer=adamw", f"optimizer.lr={args.lr}", "scheduler=poly",
               f"scheduler.warmup_iters={warmup}",
               f"trainer.max_iters={args.iters}", f"trainer.eval_every={args.iters}",
               f"trainer.ckpt_every={args.iters}", "trainer.device=cpu", "trainer.vis_images=0",
               f"data.batch_size={args.batch}", "data.num_workers=1", f"dataset.val.num_samples={args.val}",
               f"hydra.run.dir={run_dir}"]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode:
        raise SystemExit(f"{label} failed:\n{result.stderr[-2000:]}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {"mIoU": metrics["semantic"]["mIoU"], "s_per_iter": seconds / args.iters}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=300)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=0.001)
    parser.add_argument("--val", type=int, default=64, help="validation images")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = {label: train(Path(tmp), label, overrides, args) for label, overrides in RUNS.items()}
    base = results[next(iter(RUNS))]
    print(f"{args.iters} iterations x batch {args.batch}, AdamW lr {args.lr}, poly, 128-px synthetic "
          f"shapes, {args.val} val images; seconds include start-up and the final evaluation\n")
    print("| model | mIoU | vs U-Net | s/iter | vs U-Net |\n|---|---|---|---|---|")
    for label, r in results.items():
        print(f"| {label} | {r['mIoU']:.1f} | {r['mIoU'] / base['mIoU']:.2f}x | {r['s_per_iter']:.2f} | "
              f"{r['s_per_iter'] / base['s_per_iter']:.2f}x |")


if __name__ == "__main__":
    main()
