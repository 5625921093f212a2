"""Seconds to compute PQ from COCO panoptic files: segtrain's score_panoptic against panopticapi.

--images pairs of 640x480 PNGs (ground truth: 3-6 stuff regions, 8-24 things, some crowd, VOID
on segment boundaries and in blobs; predictions: the same scene with jittered shapes, dropped,
relabelled and hallucinated segments) are written to a temporary folder as COCO panoptic PNG+JSON
first (not timed). Then, in the same run, each the best of --rounds, the rounds of all of them
interleaved (this VM's speed drifts by a third over minutes; interleaving keeps ratios honest):

  segtrain             score_panoptic(...) from the files (PNG decode included), default threads
                       and one thread: libpng through ctypes (what `segtrain score` and the
                       evaluator use), and its PIL fallback (no libpng found, or a PNG with
                       gamma or transparency chunks)
  pq_compute           panopticapi's pq_compute, its default worker processes (one per CPU)
  pq_compute 1 proc    the same with multiprocessing.cpu_count patched to 1
  decode floor         only decoding the 2 x --images PNGs, sequential and in segtrain's thread
                       pool: torchvision.io.decode_png, PIL, and libpng through ctypes

and as whole processes, start-up included (best of --rounds, interleaved):

  segtrain score       python -m segtrain score task=panoptic gt=... gt_dir=... pred=... pred_dir=...
  plain script         python -c "pq_compute(...)"

All numbers must equal pq_compute's to 1e-6 (checked). Targets: pq_compute / segtrain >= 3,
pq_compute 1 proc / segtrain >= 5, segtrain / torchvision decode floor <= 1.5 (and the PIL
fallback against PIL's floor), whole process >= 2.

    python bench/pq.py [--images 200] [--rounds 5]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from unittest import mock

import numpy as np
from PIL import Image

from segtrain.metrics.panoptic import score_panoptic
from segtrain.utils import png

HEIGHT, WIDTH = 480, 640
THINGS = list(range(1, 41))
STUFF = list(range(92, 112))
CATEGORIES = [{"id": c, "name": f"cat{c}", "isthing": int(c in THINGS)} for c in THINGS + STUFF]
PLAIN_SCRIPT = """
import json, sys
from panopticapi.evaluation import pq_compute
results = pq_compute(*sys.argv[1:5])
with open(sys.argv[5], "w") as f:
    json.dump({k: results[k] for k in ("All", "Things", "Stuff")}, f)
"""


def _scene(rng: np.random.Generator) -> dict:
    """Shapes of one image: stuff Voronoi seeds and thing ellipses, each with a category."""
    stuff = int(rng.integers(3, 7))
    things = int(rng.integers(8, 25))
    return {"seeds": rng.uniform([0, 0], [HEIGHT, WIDTH], (stuff, 2)),
            "stuff_cats": rng.choice(STUFF, stuff, replace=False),
            "ellipses": np.column_stack([rng.uniform(0, HEIGHT, things), rng.uniform(0, WIDTH, things),
                                         rng.uniform(8, 70, things), rng.uniform(8, 90, things)]),
            "thing_cats": rng.choice(THINGS, things),
            "crowd": rng.random(things) < 0.05}


def _perturb(rng: np.random.Generator, scene: dict) -> dict:
    """A prediction of `scene`: shapes moved and resized, some dropped, relabelled or hallucinated."""
    out = {k: v.copy() for k, v in scene.items()}
    out["seeds"] += rng.normal(0, 25, out["seeds"].shape)
    n = len(out["ellipses"])
    out["ellipses"][:, :2] += rng.normal(0, 4, (n, 2))
    out["ellipses"][:, 2:] *= rng.uniform(0.8, 1.2, (n, 2))
    keep = rng.random(n) > 0.1
    relabel = rng.random(n) < 0.05
    out["thing_cats"] = np.where(relabel, rng.choice(THINGS, n), out["thing_cats"])
    extra = int(rng.integers(0, 4))
    out["ellipses"] = np.vstack([out["ellipses"][keep], np.column_stack([
        rng.uniform(0, HEIGHT, extra), rng.uniform(0, WIDTH, extra), rng.uniform(5, 30, (extra, 2))])])
    out["thing_cats"] = np.concatenate([out["thing_cats"][keep], rng.choice(THINGS, extra)])
    out["crowd"] = np.zeros(len(out["thing_cats"]), bool)
    return out


def _render(rng: np.random.Generator, scene: dict, void_edges: bool) -> tuple[np.ndarray, list[dict]]:
    """Segment-id map int64 (H, W) and segments_info (areas = pixel counts) of a scene."""
    yy, xx = np.mgrid[:HEIGHT, :WIDTH]
    d = (yy[..., None] - scene["seeds"][:, 0]) ** 2 + (xx[..., None] - scene["seeds"][:, 1]) ** 2
    label = d.argmin(-1)  # stuff k -> k, thing j -> stuff + j
    cats = list(scene["stuff_cats"]) + list(scene["thing_cats"])
    crowd = [False] * len(scene["stuff_cats"]) + list(scene["crowd"])
    for j, (cy, cx, ry, rx) in enumerate(scene["ellipses"]):
        y0, y1 = max(int(cy - ry), 0), min(int(cy + ry) + 1, HEIGHT)
        x0, x1 = max(int(cx - rx), 0), min(int(cx + rx) + 1, WIDTH)
        inside = ((yy[y0:y1, x0:x1] - cy) / ry) ** 2 + ((xx[y0:y1, x0:x1] - cx) / rx) ** 2 <= 1
        label[y0:y1, x0:x1][inside] = len(scene["stuff_cats"]) + j
    seg_ids = rng.choice(np.arange(1, 256**3), len(cats), replace=False)
    ids = seg_ids[label]
    if void_edges:  # COCO's VOID: one-pixel borders between segments, and a few blobs
        edge = np.zeros_like(ids, bool)
        edge[:, 1:] |= ids[:, 1:] != ids[:, :-1]
        edge[1:] |= ids[1:] != ids[:-1]
        ids[edge] = 0
    for _ in range(int(rng.integers(0, 3))):
        cy, cx = rng.integers(0, HEIGHT), rng.integers(0, WIDTH)
        ids[max(cy - 15, 0):cy + 15, max(cx - 20, 0):cx + 20] = 0
    present, counts = np.unique(ids, return_counts=True)
    area = dict(zip(present.tolist(), counts.tolist()))
    segments = [{"id": int(s), "category_id": int(c), "area": area[int(s)], "iscrowd": int(k)}
                for s, c, k in zip(seg_ids, cats, crowd) if int(s) in area]
    return ids, segments


def _save(path: Path, ids: np.ndarray) -> None:
    Image.fromarray(np.stack([(ids >> s) & 255 for s in (0, 8, 16)], -1).astype(np.uint8)).save(path)


def write_case(folder: Path, images: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    gt = {"images": [], "annotations": [], "categories": CATEGORIES}
    pred: dict = {"annotations": []}
    for sub in ("gt", "pred"):
        (folder / sub).mkdir()
    for image_id in range(1, images + 1):
        scene = _scene(rng)
        name = f"{image_id:012d}.png"
        gt_ids, gt_segments = _render(rng, scene, void_edges=True)
        pred_ids, pred_segments = _render(rng, _perturb(rng, scene), void_edges=False)
        for s in pred_segments:
            del s["iscrowd"]
        _save(folder / "gt" / name, gt_ids)
        _save(folder / "pred" / name, pred_ids)
        gt["images"].append({"id": image_id, "file_name": name.replace(".png", ".jpg"),
                             "height": HEIGHT, "width": WIDTH})
        gt["annotations"].append({"image_id": image_id, "file_name": name, "segments_info": gt_segments})
        pred["annotations"].append({"image_id": image_id, "file_name": name, "segments_info": pred_segments})
    (folder / "gt.json").write_text(json.dumps(gt))
    (folder / "pred.json").write_text(json.dumps(pred))
    return {"gt_json": folder / "gt.json", "gt_dir": folder / "gt", "pred_json": folder / "pred.json",
            "pred_dir": folder / "pred"}


def best_of(rounds: int, timed: dict[str, Callable[[], object]]) -> tuple[dict[str, float], dict]:
    """Best seconds and last result of each callable, the rounds of all of them interleaved."""
    best, results = dict.fromkeys(timed, math.inf), {}
    for _ in range(rounds):
        for name, fn in timed.items():
            start = time.perf_counter()
            results[name] = fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best, results


def pq_compute(paths: dict, processes: int | None) -> dict:
    from panopticapi import evaluation

    args = [str(paths[k]) for k in ("gt_json", "pred_json", "gt_dir", "pred_dir")]
    patch = (mock.patch.object(evaluation.multiprocessing, "cpu_count", return_value=processes)
             if processes else contextlib.nullcontext())
    with patch, contextlib.redirect_stdout(io.StringIO()):
        return evaluation.pq_compute(*args)


def check_equal(ours: dict, theirs: dict) -> None:
    panoptic = ours["panoptic"]
    for suffix, key in (("", "All"), ("_th", "Things"), ("_st", "Stuff")):
        for name in ("PQ", "SQ", "RQ"):
            assert abs(panoptic[name + suffix] - 100 * theirs[key][name.lower()]) < 1e-6, (name, key)
    for cat in CATEGORIES:
        ref = theirs["per_class"][cat["id"]] if "per_class" in theirs else None
        got = panoptic["per_class"][cat["name"]]
        if ref is not None and not math.isnan(got["PQ"]):
            assert all(abs(got[k] - 100 * ref[k.lower()]) < 1e-6 for k in ("PQ", "SQ", "RQ")), cat


def decoders(files: list[Path], pool: ThreadPoolExecutor) -> dict[str, Callable[[], object]]:
    """Decoding every file and nothing else, sequentially and in the pool, with each decoder."""
    from torchvision.io import decode_png, read_file

    local = threading.local()

    def libpng(path: Path) -> np.ndarray:  # segtrain's decoder, into a reused per-thread buffer
        local.buffer = png.decode_rgb(path.read_bytes(), getattr(local, "buffer", None))
        return local.buffer

    floors: dict[str, Callable[[], object]] = {}
    for name, decode in (("torchvision", lambda path: decode_png(read_file(str(path)))),
                         ("PIL", lambda path: Image.open(path).load()), ("libpng (ctypes)", libpng)):
        floors[f"{name}, sequential"] = lambda decode=decode: [decode(f) for f in files]
        floors[f"{name}, {pool._max_workers} threads"] = lambda decode=decode: list(pool.map(decode, files))
    return floors


def without_libpng(fn: Callable[[], object]) -> Callable[[], object]:
    """fn with segtrain's PNG decoding on its PIL fallback."""
    def run() -> object:
        with mock.patch.object(png, "_libpng", lambda: None):
            return fn()
    return run


def whole_process(paths: dict, folder: Path, rounds: int) -> dict[str, float]:
    script = folder / "plain.py"
    script.write_text(PLAIN_SCRIPT)
    commands = {
        "plain pq_compute": [sys.executable, str(script)] + [str(paths[k]) for k in
                                                             ("gt_json", "pred_json", "gt_dir", "pred_dir")]
                            + [str(folder / "plain.json")],
        "segtrain score": [sys.executable, "-m", "segtrain", "score", "task=panoptic",
                           f"gt={paths['gt_json']}", f"gt_dir={paths['gt_dir']}",
                           f"pred={paths['pred_json']}", f"pred_dir={paths['pred_dir']}",
                           f"output={folder / 'metrics.json'}",
                           f"hydra.run.dir={folder / 'run'}"],
    }
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(rounds):
        for name, command in commands.items():
            start = time.perf_counter()
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
            times[name].append(time.perf_counter() - start)
    plain = json.loads((folder / "plain.json").read_text())
    written = json.loads((folder / "metrics.json").read_text())
    check_equal(written, plain)
    return {name: min(t) for name, t in times.items()}


def _verdict(ratio: float, target: float, at_least: bool = True) -> str:
    ok = ratio >= target if at_least else ratio <= target
    return f"{ratio:5.2f} (target {'>=' if at_least else '<='} {target}): {'PASS' if ok else 'FAIL'}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    workers = min(8, os.cpu_count() or 1)
    if not png.libpng_available():
        raise SystemExit("no libpng 1.6 loads here: segtrain would decode with PIL only")
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(workers) as pool:
        folder = Path(tmp)
        paths = write_case(folder, args.images)
        annotations = json.loads(paths["gt_json"].read_text())["annotations"]
        segments = sum(len(a["segments_info"]) for a in annotations) / args.images
        print(f"{args.images} image pairs at {WIDTH}x{HEIGHT}, {segments:.1f} GT segments per image, "
              f"{os.cpu_count()} CPUs")
        files = sorted(paths["gt_dir"].iterdir()) + sorted(paths["pred_dir"].iterdir())
        timed = {
            "segtrain": lambda: score_panoptic(**paths),
            "segtrain 1 thread": lambda: score_panoptic(**paths, workers=1),
            "segtrain PIL": without_libpng(lambda: score_panoptic(**paths)),
            "pq_compute": lambda: pq_compute(paths, None),
            "pq_compute 1 proc": lambda: pq_compute(paths, 1),
            **decoders(files, pool),
        }
        seconds, results = best_of(args.rounds, timed)
        ours = results["segtrain"]
        for name in ("segtrain 1 thread", "segtrain PIL"):
            assert json.dumps(results[name]) == json.dumps(ours), f"{name} must give the same numbers"
        check_equal(ours, results["pq_compute"])
        check_equal(ours, results["pq_compute 1 proc"])
        processes = whole_process(paths, folder, args.rounds)
    print(f"segtrain score_panoptic ({workers} threads) {seconds['segtrain']:6.2f} s   (1 thread: "
          f"{seconds['segtrain 1 thread']:.2f} s; PIL fallback, {workers} threads: "
          f"{seconds['segtrain PIL']:.2f} s)")
    print(f"pq_compute ({os.cpu_count()} processes)       {seconds['pq_compute']:6.2f} s")
    print(f"pq_compute (1 process)           {seconds['pq_compute 1 proc']:6.2f} s")
    for name in seconds:
        if "," in name:
            print(f"decode {len(files)} PNGs, {name:<27} {seconds[name]:6.2f} s")
    print(f"PQ {ours['panoptic']['PQ']:.3f}: every number equals pq_compute's to 1e-6")
    ours_s = seconds["segtrain"]
    print(f"pq_compute / segtrain           = {_verdict(seconds['pq_compute'] / ours_s, 3)}")
    print(f"pq_compute 1 proc / segtrain    = {_verdict(seconds['pq_compute 1 proc'] / ours_s, 5)}")
    print(f"segtrain / torchvision floor    = "
          f"{_verdict(ours_s / seconds[f'torchvision, {workers} threads'], 1.5, at_least=False)}")
    print(f"segtrain PIL / PIL floor        = "
          f"{_verdict(seconds['segtrain PIL'] / seconds[f'PIL, {workers} threads'], 1.5, at_least=False)}")
    for name, value in processes.items():
        print(f"whole process, {name:<17} {value:6.2f} s")
    print(f"plain pq_compute / segtrain score = "
          f"{_verdict(processes['plain pq_compute'] / processes['segtrain score'], 2)}")


if __name__ == "__main__":
    main()
