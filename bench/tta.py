"""Test-time augmentation: metric gains (`segtrain eval tta=...`) and the cost multiple of the
prediction loop, against tta=none measured in the same run.

Metrics: one `segtrain eval ckpt=... tta=PRESET` per preset (the whole validation set). Cost:
the first `--images` validation images predicted in-process, the presets interleaved batch by
batch (none, flip, ms3_flip, none, ...), so that a shared machine's load weighs on all alike;
printed as seconds per image and the multiple of tta=none's.

    python bench/tta.py CKPT [CKPT ...] --out /tmp/tta_runs/bench
    python bench/tta.py CKPT --presets none flip --images 4 --no-eval   # that it runs
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_module
from hydra.utils import instantiate

from segtrain.data.loader import LoaderOptions, build_eval_loader
from segtrain.inference.tta import tta_options, with_tta
from segtrain.model_loading import load_model_from_checkpoint

HEADLINE = {"semantic": "mIoU", "segm": "AP", "bbox": "AP", "panoptic": "PQ"}


def eval_metrics(ckpt: str, preset: str, out: Path, extra: list[str]) -> tuple[dict, float]:
    """`segtrain eval` of one preset (plus `extra` overrides): (headline metrics by family,
    seconds of the command)."""
    path = out / f"{Path(ckpt).parent.parent.name}_{preset}.json"
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "segtrain", "eval", f"ckpt={ckpt}", f"tta={preset}",
                    f"output={path}", f"hydra.run.dir={out / 'hydra'}", *extra],
                   check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    metrics = json.loads(path.read_text())
    return {f"{fam}/{key}": metrics[fam][key] for fam, key in HEADLINE.items() if fam in metrics}, seconds


@torch.no_grad()
def loop_seconds(ckpt: str, presets: list[str], images: int) -> dict[str, float]:
    """Seconds per image of task.predict under each preset, interleaved batch by batch."""
    options = {}
    with initialize_config_module(config_module="segtrain.conf", version_base="1.3"):
        composed = compose("eval", overrides=[f"ckpt={ckpt}"])
        for preset in presets:
            options[preset] = tta_options(compose("eval", overrides=[f"ckpt={ckpt}", f"tta={preset}"]).tta)
    loaded = load_model_from_checkpoint(ckpt, composed, [], device=lambda _: torch.device("cpu"))
    val = instantiate(loaded.run_cfg.dataset.val)
    subset = torch.utils.data.Subset(val, range(min(images, len(val))))
    loader = build_eval_loader(subset, int(loaded.run_cfg.data.val_batch_size), loaded.task.collate,
                               LoaderOptions(num_workers=0, pin_memory=False))
    tasks = {preset: with_tta(loaded.task, opt) for preset, opt in options.items()}
    seconds = dict.fromkeys(presets, 0.0)
    for task in tasks.values():  # warm-up (allocator, oneDNN kernels), untimed
        task.predict(loaded.model, next(iter(loader)))
    for batch in loader:
        for preset, task in tasks.items():
            start = time.perf_counter()
            task.predict(loaded.model, batch)
            seconds[preset] += time.perf_counter() - start
    return {preset: s / len(subset) for preset, s in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ckpts", nargs="+")
    parser.add_argument("--presets", nargs="+", default=["none", "flip", "ms3_flip"])
    parser.add_argument("--images", type=int, default=16, help="validation images timed in-process")
    parser.add_argument("--out", default="outputs/bench_tta")
    parser.add_argument("--no-eval", action="store_true", help="time only, no segtrain eval")
    parser.add_argument("--eval-args", nargs="*", default=[],
                        help="overrides for segtrain eval, e.g. dataset.val.num_samples=32")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(os.cpu_count() or 1)
    print(f"load average {os.getloadavg()[0]:.1f}; {args.images} images timed per preset")
    rows = []
    for ckpt in args.ckpts:
        per_image = loop_seconds(ckpt, args.presets, args.images)
        for preset in args.presets:
            metrics, seconds = ({}, float("nan")) if args.no_eval else \
                eval_metrics(ckpt, preset, out, args.eval_args)
            row = {"ckpt": ckpt, "tta": preset, **{k: round(v, 2) for k, v in metrics.items()},
                   "eval_s": round(seconds, 1), "s_per_image": round(per_image[preset], 4),
                   "cost_x": round(per_image[preset] / per_image[args.presets[0]], 2)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    (out / "results.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
