"""Seconds to evaluate instance predictions: segtrain's COCOEvaluator against plain pycocotools.

--images images of 640x480 with ~--dets mask predictions each (the masks of --distinct images are
generated once, before any timing, and reused cyclically so memory stays bounded; every image
is still encoded on its own). The predictions are what InstanceTask.predict returns, including
`mask_boxes` (each mask's extent, computed on the model's device in predict; its CPU cost is
printed separately). Timed in the same run, over the same predictions, segm and bbox:

  segtrain     COCOEvaluator(gt=dict).process(batch, predictions) per image, then compute()
  pycocotools  mask.encode per image, COCO.loadRes, COCOeval evaluate/accumulate/summarize

Both give the same 12 numbers for each IoU type (checked). Target: pycocotools/segtrain >= 3.

    python bench/coco_eval.py [--images 500] [--dets 48] [--distinct 16]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import time

import numpy as np
import torch
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from segtrain.data.meta import DatasetMeta, default_palette
from segtrain.metrics.coco import COCOEvaluator
from segtrain.metrics.rle import tight_boxes

HEIGHT, WIDTH, CLASSES = 480, 640, 10
STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def ellipses(rng: np.random.Generator, count: int) -> tuple[np.ndarray, np.ndarray]:
    """`count` filled ellipses: bool masks (count, H, W) and their parameters (cx, cy, rx, ry)."""
    params = np.stack([rng.uniform(0, WIDTH, count), rng.uniform(0, HEIGHT, count),
                       rng.uniform(8, 120, count), rng.uniform(8, 90, count)], 1)
    ys, xs = np.ogrid[:HEIGHT, :WIDTH]
    masks = np.stack([((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1 for cx, cy, rx, ry in params])
    return masks, params


def make_case(images: int, dets: int, distinct: int, seed: int = 0):
    """GT (COCO dict) and, per distinct image, prediction tensors; image i uses set i % distinct."""
    rng = np.random.default_rng(seed)
    predictions, gt_sets = [], []
    for _ in range(distinct):
        gt_masks, params = ellipses(rng, int(rng.integers(5, 20)))
        gt_labels = rng.integers(1, CLASSES, len(gt_masks))
        # Predictions: jittered copies of the GT (true positives at various IoUs) plus clutter.
        picked = rng.integers(0, len(params), dets // 2)
        jitter = params[picked]
        jitter = jitter + rng.normal(0, 4, jitter.shape) * [1, 1, 0, 0] + rng.normal(0, 0.06, jitter.shape) \
            * jitter * [0, 0, 1, 1]
        ys, xs = np.ogrid[:HEIGHT, :WIDTH]
        near = np.stack([((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1
                         for cx, cy, rx, ry in jitter])
        clutter, _ = ellipses(rng, dets - dets // 2)
        masks = torch.from_numpy(np.concatenate([near, clutter]))
        clutter_labels = rng.integers(1, CLASSES, dets - dets // 2)
        labels = torch.from_numpy(np.concatenate([gt_labels[picked], clutter_labels]))
        boxes = torch.zeros(dets, 4)
        for k, m in enumerate(masks):
            yy, xx = torch.nonzero(m, as_tuple=True)
            if len(xx):
                boxes[k] = torch.tensor([xx.min(), yy.min(), xx.max() + 1, yy.max() + 1]).float()
        predictions.append({"masks": masks, "boxes": boxes, "labels": labels.long(),
                            "scores": torch.from_numpy(rng.uniform(0, 1, dets)).float(),
                            "mask_boxes": tight_boxes(masks)})
        gt_sets.append((gt_masks, gt_labels))
    gt_images, annotations = [], []
    for image_id in range(1, images + 1):
        gt_images.append({"id": image_id, "height": HEIGHT, "width": WIDTH, "file_name": f"{image_id}.jpg"})
        gt_masks, gt_labels = gt_sets[(image_id - 1) % distinct]
        rles = mask_util.encode(np.asfortranarray(gt_masks.transpose(1, 2, 0).astype(np.uint8)))
        for rle, label in zip(rles, gt_labels):
            rle["counts"] = rle["counts"].decode("ascii")
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": int(label),
                                "segmentation": rle, "area": float(mask_util.area(rle)),
                                "bbox": mask_util.toBbox(rle).tolist(), "iscrowd": 0})
    categories = [{"id": k, "name": f"class{k}"} for k in range(1, CLASSES)]
    return {"images": gt_images, "annotations": annotations, "categories": categories}, predictions


def run_segtrain(gt: dict, predictions: list[dict], images: int) -> dict:
    names = ["background", *(f"class{k}" for k in range(1, CLASSES))]
    meta = DatasetMeta(names, default_palette(CLASSES), thing_ids=list(range(1, CLASSES)), stuff_ids=[0])
    evaluator = COCOEvaluator(meta, gt=gt, iou_types=("segm", "bbox"), area_from="bbox")
    for image_id in range(1, images + 1):
        target = {"image_id": image_id, "orig_size": torch.tensor([HEIGHT, WIDTH])}
        evaluator.process({"targets": [target]}, [predictions[(image_id - 1) % len(predictions)]])
    return evaluator.compute()


def run_pycocotools(gt: dict, predictions: list[dict], images: int) -> dict:
    results = []
    for image_id in range(1, images + 1):
        p = predictions[(image_id - 1) % len(predictions)]
        masks = p["masks"].numpy().transpose(1, 2, 0).astype(np.uint8)
        rles = mask_util.encode(np.asfortranarray(masks))
        boxes = p["boxes"].numpy()
        for rle, box, label, score in zip(rles, boxes, p["labels"].tolist(), p["scores"].tolist()):
            rle["counts"] = rle["counts"].decode("ascii")
            x0, y0, x1, y1 = (float(v) for v in box)
            results.append({"image_id": image_id, "category_id": label, "segmentation": rle, "score": score,
                            "bbox": [x0, y0, x1 - x0, y1 - y0]})
    metrics = {}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(results)
        for iou_type in ("segm", "bbox"):
            coco_eval = COCOeval(coco_gt, coco_dt, iou_type)
            coco_eval.evaluate()
            coco_eval.accumulate()
            coco_eval.summarize()
            metrics[iou_type] = {n: (math.nan if v < 0 else 100 * v) for n, v in zip(STATS, coco_eval.stats)}
    return metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--dets", type=int, default=48)
    parser.add_argument("--distinct", type=int, default=16)
    args = parser.parse_args()
    start = time.perf_counter()
    gt, predictions = make_case(args.images, args.dets, args.distinct)
    print(f"{args.images} images {WIDTH}x{HEIGHT}, {args.dets} mask predictions each "
          f"({args.distinct} distinct sets), {len(gt['annotations'])} GT instances; "
          f"generated in {time.perf_counter() - start:.1f} s; torch threads {torch.get_num_threads()}")
    start = time.perf_counter()
    for image_id in range(args.images):
        tight_boxes(predictions[image_id % len(predictions)]["masks"])
    print(f"mask_boxes (tight_boxes in InstanceTask.predict, not in the timings): "
          f"{time.perf_counter() - start:.2f} s on this CPU for {args.images} images")
    timings, outputs = {}, {}
    for name, fn in (("pycocotools", run_pycocotools), ("segtrain", run_segtrain)):
        start = time.perf_counter()
        outputs[name] = fn(gt, predictions, args.images)
        timings[name] = time.perf_counter() - start
    for iou_type in ("segm", "bbox"):
        for stat in STATS:
            a, b = outputs["segtrain"][iou_type][stat], outputs["pycocotools"][iou_type][stat]
            assert (math.isnan(a) and math.isnan(b)) or abs(a - b) < 1e-4, (iou_type, stat, a, b)
    for name, seconds in timings.items():
        print(f"{name:<12} {seconds:7.2f} s   segm AP {outputs[name]['segm']['AP']:.2f}  "
              f"bbox AP {outputs[name]['bbox']['AP']:.2f}")
    ratio = timings["pycocotools"] / timings["segtrain"]
    print(f"pycocotools/segtrain = {ratio:.2f} (target >= 3): {'PASS' if ratio >= 3 else 'FAIL'}")


if __name__ == "__main__":
    main()
