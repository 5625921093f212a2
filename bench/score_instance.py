"""`segtrain score task=instance` as a whole process against a plain pycocotools script.

The ground truth and a results JSON (mask RLEs and boxes) are written to a temporary folder
first, from the same generated case as bench/coco_eval.py (not timed). Then each command runs as
its own process, start-up and JSON parsing included, rounds alternating:

  segtrain     python -m segtrain score task=instance gt=GT pred=RESULTS output=metrics.json
  pycocotools  COCO(GT), loadRes(RESULTS), COCOeval evaluate/accumulate/summarize, segm and bbox

Both must report the same 12 numbers per IoU type (checked). Target: pycocotools/segtrain >= 2.

    python bench/score_instance.py [--images 500] [--dets 48] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from coco_eval import STATS, make_case

from segtrain.data.meta import DatasetMeta, default_palette
from segtrain.metrics.coco import predictions_to_results, write_results

PLAIN_SCRIPT = """
import json, sys
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
coco_gt = COCO(sys.argv[1])
coco_dt = coco_gt.loadRes(sys.argv[2])
stats = {}
for iou_type in ("segm", "bbox"):
    coco_eval = COCOeval(coco_gt, coco_dt, iou_type)
    coco_eval.evaluate()
    coco_eval.accumulate()
    coco_eval.summarize()
    stats[iou_type] = list(coco_eval.stats)
with open(sys.argv[3], "w") as f:
    json.dump(stats, f)
"""


def write_case(folder: Path, images: int, dets: int) -> tuple[Path, Path]:
    gt, predictions = make_case(images, dets, distinct=16)
    classes = 1 + max(c["id"] for c in gt["categories"])
    meta = DatasetMeta([f"c{k}" for k in range(classes)], default_palette(classes))
    results = []
    for image_id in range(1, images + 1):
        results.extend(predictions_to_results(image_id, predictions[(image_id - 1) % len(predictions)], meta))
    (folder / "gt.json").write_text(json.dumps(gt))
    write_results(results, folder / "results.json")
    return folder / "gt.json", folder / "results.json"


def timed(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--dets", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        gt, results = write_case(folder, args.images, args.dets)
        script = folder / "plain.py"
        script.write_text(PLAIN_SCRIPT)
        commands = {
            "pycocotools": [sys.executable, str(script), str(gt), str(results), str(folder / "plain.json")],
            "segtrain": [sys.executable, "-m", "segtrain", "score", "task=instance", f"gt={gt}",
                         f"pred={results}", f"output={folder / 'metrics.json'}",
                         f"hydra.run.dir={folder / 'run'}"],
        }
        print(f"{args.images} images, {args.dets} mask results each: results JSON "
              f"{results.stat().st_size / 2**20:.1f} MiB")
        times: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(args.rounds):
            for name, command in commands.items():
                times[name].append(timed(command))
        plain = json.loads((folder / "plain.json").read_text())
        ours = json.loads((folder / "metrics.json").read_text())
    for iou_type in ("segm", "bbox"):
        for name, value in zip(STATS, plain[iou_type]):
            expected = math.nan if value < 0 else 100 * value
            got = ours[iou_type][name]
            assert (math.isnan(expected) and got is None) or abs(got - expected) < 1e-6, (iou_type, name)
    medians = {name: statistics.median(t) for name, t in times.items()}
    for name, seconds in medians.items():
        print(f"{name:<12} {seconds:6.2f} s  (rounds: {', '.join(f'{t:.2f}' for t in times[name])})")
    ratio = medians["pycocotools"] / medians["segtrain"]
    print(f"pycocotools/segtrain = {ratio:.2f} (target >= 2): {'PASS' if ratio >= 2 else 'FAIL'}")


if __name__ == "__main__":
    main()
