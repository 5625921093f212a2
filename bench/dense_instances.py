"""Dense small objects: Mask R-CNN vs Mask Scoring R-CNN vs spatial embeddings at one time budget.

Each model trains from scratch on the synthetic cells (dataset=synthetic_cells: 26-80 small
touching blobs per 128-px image) for the same wall-clock budget, with its own small preset
(experiment=synthetic_maskrcnn / synthetic_ms_rcnn / synthetic_spatial_embeddings; the detectors
get the dense settings below: 100 detections, more proposals, small anchors when the builder
takes them), then predicts the same validation images: mask AP and AP50 (COCO) and inference
images/s (model + post-processing, batch 4, evaluator excluded). The training images are
generated once and shared (the generator costs ~60 ms a cell image, which would otherwise eat
into the budget); the lr schedule of each preset is stretched over the iterations its
measured step time allows. The load average is printed: the machine may be shared.

    python bench/dense_instances.py --seconds 300
    python bench/dense_instances.py --dry-run
"""

from __future__ import annotations

import argparse
import inspect
import os
import time
from typing import Any

import torch
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate

from segtrain.builders import build_data, build_task
from segtrain.train import build_optimizer

# Detectors: room for 80 objects per image, proposals to find them.
DENSE_DETECTOR = ["model.box_detections_per_img=100", "model.rpn_pre_nms_top_n_train=600",
                  "model.rpn_post_nms_top_n_train=300", "model.rpn_pre_nms_top_n_test=600",
                  "model.rpn_post_nms_top_n_test=300"]
SMALL_ANCHORS = "model.anchor_sizes=[8,16,32,64,128]"  # cells are 8-24 px wide; default FPN: 32..512
MODELS = {
    "maskrcnn_small": ["experiment=synthetic_maskrcnn", *DENSE_DETECTOR],
    "ms_rcnn": ["experiment=synthetic_ms_rcnn", *DENSE_DETECTOR],
    "spatial_embeddings": ["experiment=synthetic_spatial_embeddings"],
}


def _compose(overrides: list[str]) -> Any:
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="segtrain.conf", version_base="1.3"):
        return compose("train", overrides=overrides)


def _available(name: str) -> str | None:
    """None when the model can run here, else why not."""
    conf = os.path.join(os.path.dirname(__file__), "..", "conf")
    if not os.path.exists(os.path.join(conf, "model", f"{name}.yaml")):
        return f"conf/model/{name}.yaml does not exist"
    preset = MODELS[name][0].split("=")[1]
    if not os.path.exists(os.path.join(conf, "experiment", f"{preset}.yaml")):
        return f"conf/experiment/{preset}.yaml does not exist"
    return None


def run_one(name: str, seconds: float, train_cache: int, val_images: int, batch: int) -> dict[str, Any]:
    overrides = [*MODELS[name], "dataset=synthetic_cells", f"dataset.val.num_samples={val_images}",
                 f"data.batch_size={batch}"]
    if name != "spatial_embeddings":
        from segtrain.models.maskrcnn import build_maskrcnn

        if "anchor_sizes" in inspect.signature(build_maskrcnn).parameters:
            overrides.append(SMALL_ANCHORS)
    cfg = _compose(overrides)
    torch.manual_seed(0)
    train_set, val_set = build_data(cfg)
    task = build_task(cfg, train_set.meta)
    model = instantiate(cfg.model).train()
    optimizer = build_optimizer(cfg.optimizer, model)
    samples = [train_set[i] for i in range(train_cache)]  # same images (and flips) for every model
    batches = [task.collate(samples[i: i + batch]) for i in range(0, train_cache - batch + 1, batch)]

    def step(b: dict[str, Any]) -> None:
        losses = task.training_step(model, b)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        optimizer.step()

    start = time.perf_counter()
    for b in batches[:3]:  # measured warm-up steps, counted in the budget, at the base lr
        step(b)
    per_step = (time.perf_counter() - start) / 3
    total = max(int(seconds / per_step), 4)
    if cfg.scheduler.get("warmup_iters", 0) >= total:  # a tiny budget (--dry-run)
        cfg.scheduler.warmup_iters = total // 4
    scheduler = instantiate(cfg.scheduler)(optimizer, total)
    iters = 3
    while time.perf_counter() - start < seconds and iters < 100 * total:
        step(batches[iters % len(batches)])
        scheduler.step()
        iters += 1
    trained = time.perf_counter() - start

    model.eval()
    evaluator = task.build_evaluator()
    val = [val_set[i] for i in range(len(val_set))]
    predicted = 0.0
    with torch.no_grad():
        for i in range(0, len(val), 4):
            b = task.collate(val[i: i + 4])
            t = time.perf_counter()
            predictions = task.predict(model, b)
            predicted += time.perf_counter() - t
            evaluator.process(b["targets"], predictions)
    metrics = evaluator.compute()
    return {"model": name, "iters": iters, "train_s": trained, "AP": metrics["segm"]["AP"],
            "AP50": metrics["segm"]["AP50"], "img_s": len(val) / predicted,
            "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
            "load": os.getloadavg()[0], "overrides": " ".join(overrides)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=300.0, help="training budget per model")
    parser.add_argument("--val", type=int, default=32, help="validation images")
    parser.add_argument("--train-cache", type=int, default=256, help="distinct training images")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated subset")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--dry-run", action="store_true", help="3 s each, 4 + 8 images: that it runs")
    args = parser.parse_args()
    if args.threads:  # on a shared machine one thread each can beat two contended ones
        torch.set_num_threads(args.threads)
    if args.dry_run:
        args.seconds, args.val, args.train_cache = 3.0, 4, 8
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}; budget {args.seconds:.0f} s per model")
    rows = []
    for name in args.models.split(","):
        why = _available(name)
        if why:
            print(f"SKIPPED {name}: {why}")
            continue
        row = run_one(name, args.seconds, args.train_cache, args.val, args.batch)
        print(f"{name}: {row['overrides']}\n  {row['iters']} iterations, mask AP {row['AP']:.1f}, AP50 "
              f"{row['AP50']:.1f}, {row['img_s']:.1f} img/s; load average at the end {row['load']:.1f}",
              flush=True)
        rows.append(row)
    print(f"\n{'model':<20}{'iters':>7}{'train s':>9}{'mask AP':>9}{'AP50':>7}{'img/s':>8}{'params M':>10}")
    for row in rows:
        print(f"{row['model']:<20}{row['iters']:>7}{row['train_s']:>9.0f}{row['AP']:>9.1f}"
              f"{row['AP50']:>7.1f}{row['img_s']:>8.1f}{row['params_M']:>10.2f}")


if __name__ == "__main__":
    main()
