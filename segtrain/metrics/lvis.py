"""LVIS v1 evaluation: the official LVISEval rules (lvis-api 0.5.3) on top of pycocotools' COCOeval.

The `lvis` package itself is not a dependency: it calls `np.float` (gone since NumPy 1.24) and
pulls in opencv. Its rules differ from COCO's in five places, reproduced here exactly:
- results: only the 300 top-scoring detections per image are kept (stable sort by score), then
  detections with area <= 0 are dropped (the area is the box's w*h when the first result has a
  `bbox`, else the mask area); ground truth with area <= 0 is dropped too;
- federated: on each image only categories with ground truth there or listed in its
  `neg_category_ids` are evaluated; other detections are discarded;
- an unmatched detection of a category in the image's `not_exhaustive_category_ids` is ignored;
- no crowd regions (an annotation's optional `ignore` flag excludes it instead);
- AP is summarised per frequency group (APr/APc/APf) and AR at 300 detections (`AR300`).
Values are percentages; -1 (nothing to evaluate) is NaN, as in `segtrain.metrics.coco`.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pycocotools.mask as mask_util
from pycocotools.cocoeval import COCOeval

from segtrain.data.meta import DatasetMeta
from segtrain.metrics.coco import (
    IOU_TYPES,
    InstanceEvaluator,
    _check_options,
    _mean_valid,
    _percent,
    build_coco,
    category_names,
    load_json,
    predictions_to_results,
    quiet,
    result_iou_types,
    validate_results,
)
from segtrain.metrics.fast_cocoeval import FastCOCOeval

MAX_DETS = 300
FREQUENCIES = ("r", "c", "f")


def limit_detections(results: list[dict], max_dets: int = MAX_DETS) -> list[dict]:
    """LVISResults.limit_dets_per_image: the `max_dets` top-scoring results of each image."""
    per_image: dict[int, list[dict]] = defaultdict(list)
    for r in results:
        per_image[r["image_id"]].append(r)
    kept = []
    for anns in per_image.values():
        if len(anns) > max_dets:
            anns = sorted(anns, key=lambda r: r["score"], reverse=True)[:max_dets]
        kept.extend(anns)
    return kept


def _with_area(results: list[dict]) -> list[dict]:
    """Copies with LVISResults' `area`, `id` and missing `bbox`/`segmentation` filled in."""
    use_box = "bbox" in results[0]
    out = []
    for i, r in enumerate(results):
        r = dict(r, id=i + 1, iscrowd=0)
        if use_box:
            x, y, w, h = r["bbox"]
            r.setdefault("segmentation", [[x, y, x, y + h, x + w, y + h, x + w, y]])
            r["area"] = w * h
        else:
            r["area"] = float(mask_util.area(r["segmentation"]))
            if "bbox" not in r:
                r["bbox"] = mask_util.toBbox(r["segmentation"]).tolist()
        out.append(r)
    return out


class FederatedRules:
    """LVIS's ground-truth `ignore` and not-exhaustive categories, mixed into a COCOeval class:
    unmatched detections of a not-exhaustively annotated category of an image are ignored."""

    def __init__(self, coco_gt: Any, coco_dt: Any, iou_type: str,
                 not_exhaustive: dict[int, set[int]]) -> None:
        super().__init__(coco_gt, coco_dt, iou_type)
        self.not_exhaustive = not_exhaustive

    def _prepare(self) -> None:
        super()._prepare()
        # COCOeval sets ignore = iscrowd; LVIS has no crowds and honours an explicit `ignore`.
        for gts in self._gts.values():
            for g in gts:
                g["ignore"] = g["lvis_ignore"]

    def ignores_unmatched(self, image_id: int, category_id: int) -> bool:  # FastCOCOeval's hook
        return category_id in self.not_exhaustive.get(image_id, ())

    def evaluateImg(self, imgId: int, catId: int, aRng: list, maxDet: int) -> dict | None:  # noqa: N802, N803
        result = super().evaluateImg(imgId, catId, aRng, maxDet)  # COCOeval's path
        if result is not None and self.ignores_unmatched(imgId, catId):
            result["dtIgnore"] = np.logical_or(result["dtIgnore"], result["dtMatches"] == 0)
        return result


class FederatedCOCOeval(FederatedRules, COCOeval):
    """LVISEval's matching on pycocotools' COCOeval (the reference code path)."""


class FastFederatedCOCOeval(FederatedRules, FastCOCOeval):
    """LVISEval's matching on FastCOCOeval (same numbers, vectorised)."""


FEDERATED_BACKENDS = {"fast": FastFederatedCOCOeval, "pycocotools": FederatedCOCOeval}


def _federated(gt: dict, results: list[dict], iou_type: str, area_from: str) -> tuple[dict, list[dict]]:
    """(ground truth, detections) as LVISEval sees them after its filters."""
    gt_anns = [dict(a, iscrowd=0, lvis_ignore=a.get("ignore", 0)) for a in gt["annotations"]
               if 0 < a["area"] < math.inf]
    if iou_type == "segm" and area_from == "mask":
        results = [{k: v for k, v in r.items() if k != "bbox"} for r in results]
    dets = _with_area(limit_detections(results)) if results else []
    category_ids = {c["id"] for c in gt["categories"]}
    positive: dict[int, set[int]] = defaultdict(set)
    for a in gt_anns:
        positive[a["image_id"]].add(a["category_id"])
    negative = {img["id"]: set(img.get("neg_category_ids", ())) for img in gt["images"]}
    dets = [d for d in dets if 0 < d["area"] < math.inf and d["category_id"] in category_ids
            and (d["category_id"] in positive[d["image_id"]]
                 or d["category_id"] in negative.get(d["image_id"], ()))]
    return dict(gt, annotations=gt_anns), dets


def summarize_lvis(coco_eval: COCOeval, class_names: Sequence[str], groups: dict[str, list[int]]) -> dict:
    """LVISEval.summarize's numbers (percent, NaN for -1) plus per-class AP (area all)."""
    p = coco_eval.params
    precision, recall = coco_eval.eval["precision"], coco_eval.eval["recall"]  # T,R,K,A,1 / T,K,A,1
    area = {label: i for i, label in enumerate(p.areaRngLbl)}
    at50, at75 = np.where(p.iouThrs == 0.5)[0], np.where(p.iouThrs == 0.75)[0]
    stats = {
        "AP": _mean_valid(precision[:, :, :, area["all"], 0]),
        "AP50": _mean_valid(precision[at50][:, :, :, area["all"], 0]),
        "AP75": _mean_valid(precision[at75][:, :, :, area["all"], 0]),
        "APs": _mean_valid(precision[:, :, :, area["small"], 0]),
        "APm": _mean_valid(precision[:, :, :, area["medium"], 0]),
        "APl": _mean_valid(precision[:, :, :, area["large"], 0]),
    }
    for freq in FREQUENCIES:
        stats[f"AP{freq}"] = _mean_valid(precision[:, :, groups[freq], area["all"], 0])
    stats[f"AR{p.maxDets[-1]}"] = _mean_valid(recall[:, :, area["all"], 0])
    for key in ("small", "medium", "large"):
        stats[f"AR{key[0]}"] = _mean_valid(recall[:, :, area[key], 0])
    metrics: dict[str, Any] = {name: _percent(value) for name, value in stats.items()}
    metrics["per_class"] = {
        name: {"AP": _percent(_mean_valid(precision[:, :, k, area["all"], 0]))}
        for k, name in enumerate(class_names)
    }
    return metrics


def evaluate_lvis(gt: dict, results: list[dict], iou_types: Iterable[str] = IOU_TYPES,
                  area_from: str = "mask", image_ids: Iterable[int] | None = None,
                  backend: str = "fast") -> dict:
    """LVISEval of `results` (COCO-style result dicts) against an LVIS v1 dict, per IoU type.

    image_ids: evaluate only these images (default: every image of the ground truth).
    backend: "fast" (FastCOCOeval) or "pycocotools" (COCOeval); the numbers are the same.
    """
    iou_types = _check_options(iou_types, area_from, backend)
    cats = sorted(gt["categories"], key=lambda c: c["id"])
    groups = {f: [k for k, c in enumerate(cats) if c.get("frequency") == f] for f in FREQUENCIES}
    not_exhaustive = {img["id"]: set(img.get("not_exhaustive_category_ids", ())) for img in gt["images"]}
    metrics = {}
    for iou_type in iou_types:
        gt_filtered, dets = _federated(gt, results, iou_type, area_from)
        coco_gt = build_coco(gt_filtered)
        coco_dt = build_coco({"images": gt["images"], "categories": gt["categories"], "annotations": dets})
        coco_eval = FEDERATED_BACKENDS[backend](coco_gt, coco_dt, iou_type, not_exhaustive)
        coco_eval.params.maxDets = [MAX_DETS]
        if image_ids is not None:
            coco_eval.params.imgIds = sorted(set(image_ids))
        with quiet():
            coco_eval.evaluate()
            coco_eval.accumulate()
        metrics[iou_type] = summarize_lvis(coco_eval, category_names(gt), groups)
    return metrics


def _load_lvis_gt(gt_json: str | Path | dict) -> dict:
    gt = gt_json if isinstance(gt_json, dict) else load_json(gt_json, "ground-truth")
    if not isinstance(gt, dict) or not {"images", "annotations", "categories"} <= gt.keys():
        raise ValueError(f"ground truth {gt_json if not isinstance(gt_json, dict) else '(dict)'} is not "
                         "an LVIS JSON (a dict with images, annotations, categories)")
    return gt


def score_lvis(gt_json: str | Path, results_json: str | Path, iou_types: Iterable[str] | None = None,
               area_from: str = "bbox", backend: str = "fast") -> dict:
    """Score a results JSON against an LVIS v1 JSON, as LVISEval does on the file.

    iou_types: None = those every result supports. area_from: "bbox" (LVISResults) or "mask".
    backend: "fast" or "pycocotools" (see `evaluate_lvis`).
    """
    _check_options(IOU_TYPES if iou_types is None else iou_types, area_from, backend)
    gt = _load_lvis_gt(gt_json)
    results = load_json(results_json, "results")
    validate_results(results, gt, f"results file {results_json}")
    iou_types = result_iou_types(results) if iou_types is None else iou_types
    return evaluate_lvis(gt, results, iou_types, area_from, backend=backend)


class LVISEvaluator(InstanceEvaluator):
    """LVIS mask/box AP (federated rules) of instance predictions against an LVIS v1 JSON.

    Only the processed images are evaluated. results_path: where to write the results JSON.
    backend: "fast" or "pycocotools" (the same numbers; see `evaluate_lvis`).
    """

    def __init__(self, meta: DatasetMeta, gt: str | Path | dict, iou_types: Iterable[str] = IOU_TYPES,
                 area_from: str = "mask", results_path: str | Path | None = None,
                 backend: str = "fast") -> None:
        if gt is None:
            raise ValueError("LVISEvaluator needs gt= an LVIS JSON (negative and not-exhaustive "
                             "category lists exist only there)")
        super().__init__(meta, gt, iou_types, area_from, results_path, backend)
        self._gt: dict | None = None
        self.reset()

    def reset(self) -> None:
        self._add_list_state("results")
        self._add_list_state("image_ids")

    def process(self, targets: Sequence[dict], predictions: Sequence[dict]) -> None:
        """targets: per-image dicts (only `image_id` is read); predictions: per-image dicts with
        `instances`."""
        for target, prediction in self._per_image(targets, predictions):
            image_id = int(target["image_id"])
            self.image_ids.append(image_id)
            self.results.extend(predictions_to_results(image_id, prediction, self.meta))

    def _compute(self, state: dict[str, Any]) -> dict:
        if self._gt is None:
            self._gt = _load_lvis_gt(self._gt_source)
        results = state["results"]
        validate_results(results, self._gt, "predictions")
        self._write_results(results)
        return self._write_per_class(evaluate_lvis(self._gt, results, self.iou_types, self.area_from,
                                                   state["image_ids"], self.backend))
