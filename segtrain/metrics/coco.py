"""COCO instance evaluation (mask and box AP/AR): a thin wrapper around pycocotools' COCOeval.

Conventions (see README "Metrics conventions"):
- Values are percentages; a statistic COCOeval reports as -1 (no ground truth in that range) is NaN,
  as detectron2 reports it.
- The area that puts a segm result in small/medium/large: `area_from="mask"` drops the result's
  `bbox` before `loadRes` so the mask area is used (detectron2, MMDetection; the evaluator's
  default); `area_from="bbox"` loads the results as given, where pycocotools takes the area from
  the box (`segtrain score`'s default, i.e. the official evaluator on the file).
- Empty results are scored as an empty detection set (pycocotools' `loadRes` crashes on them).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pycocotools.mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from segtrain.data.meta import DatasetMeta
from segtrain.metrics.base import Evaluator
from segtrain.metrics.fast_cocoeval import FastCOCOeval
from segtrain.metrics.rle import encode_in_boxes
from segtrain.utils.distributed import is_main_process
from segtrain.utils.files import load_json, write_atomically

IOU_TYPES = ("segm", "bbox")
AREA_FROM = ("mask", "bbox")
# "fast": the same numbers with the matching and accumulation vectorised (tests prove it equal);
# "pycocotools": COCOeval itself, for whoever wants the reference code path.
BACKENDS = {"fast": FastCOCOeval, "pycocotools": COCOeval}
AP_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def quiet() -> contextlib.AbstractContextManager:
    """Swallow pycocotools' progress prints (the numbers are read from its arrays instead)."""
    return contextlib.redirect_stdout(io.StringIO())


def _numpy(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def encode_masks(masks: Any, boxes: Any = None) -> list[dict]:
    """RLEs of masks: bool/uint8 (N, H, W) -> N dicts {"size": [H, W], "counts": str} (JSON-ready).

    boxes: optional int (N, 4) x0, y0, x1, y1 (exclusive end) outside which each mask is zero; with
    them only the boxes are read (`rle.encode_in_boxes`: ~13x faster on 48 predictions at 480x640),
    with identical results.
    """
    masks = _numpy(masks)
    if boxes is not None:
        return encode_in_boxes(masks, _numpy(boxes))
    # bool -> uint8 as a view: encoding is most of an evaluation's time, a copy is a quarter of it.
    masks = masks.view(np.uint8) if masks.dtype == np.bool_ else masks.astype(np.uint8, copy=False)
    if masks.shape[0] == 0:
        return []
    # pycocotools wants (H, W, N) in Fortran order, i.e. each mask column-major.
    rles = mask_util.encode(np.asfortranarray(masks.transpose(1, 2, 0)))
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


def _xywh(boxes: Any) -> np.ndarray:
    boxes = _numpy(boxes).astype(np.float64).reshape(-1, 4)
    return np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)


def _category_id(meta: DatasetMeta, label: int) -> int:
    return meta.category_ids[label] if meta.category_ids is not None else int(label)


def predictions_to_results(image_id: int, prediction: dict, meta: DatasetMeta) -> list[dict]:
    """COCO result dicts of one image's predictions.

    prediction: `masks` bool/uint8 (N, H, W) at the original size (optional), `boxes` float XYXY
    (N, 4), `labels` int64 contiguous ids (N,), `scores` float (N,); optional `mask_boxes` int64
    (N, 4) x0, y0, x1, y1 (exclusive end) outside which each mask is zero, e.g. from
    `rle.tight_boxes`: they make encoding read only the boxes (same results). A mask that is
    non-zero outside its mask box is encoded wrongly, not detected.
    """
    labels = _numpy(prediction["labels"]).tolist()
    scores = _numpy(prediction["scores"]).astype(np.float64).tolist()
    boxes = _xywh(prediction["boxes"]).tolist()
    rles = encode_masks(prediction["masks"], prediction.get("mask_boxes")) if "masks" in prediction else None
    results = []
    for i, (label, score, box) in enumerate(zip(labels, scores, boxes)):
        result = {"image_id": int(image_id), "category_id": _category_id(meta, label),
                  "bbox": box, "score": score}
        if rles is not None:
            result["segmentation"] = rles[i]
        results.append(result)
    return results


def targets_to_annotations(target: dict, meta: DatasetMeta) -> tuple[dict, list[dict]]:
    """The COCO image record and ground-truth annotations (without ids) of one target.

    target: `image_id` int, `orig_size` int64 [H, W] (default: the masks' size), `masks` bool
    (N, H, W) at that size,
    `boxes` float XYXY (N, 4), `labels` int64 (N,), `iscrowd` int64 (N,); optional `area` (N,)
    (e.g. the dataset's polygon areas; the mask pixel count otherwise).
    """
    masks = _numpy(target["masks"])
    size = _numpy(target["orig_size"]).tolist() if "orig_size" in target else masks.shape[1:]
    height, width = (int(v) for v in size)
    image = {"id": int(target["image_id"]), "height": height, "width": width}
    if tuple(masks.shape[1:]) != (height, width):
        raise ValueError(
            f"image {image['id']}: target masks are {tuple(masks.shape[1:])} but orig_size is "
            f"{(height, width)}; evaluation needs the ground truth at the original image size "
            "(evaluate without resizing transforms, or pass the annotation JSON as gt)"
        )
    rles = encode_masks(masks)
    areas = (_numpy(target["area"]).astype(np.float64).tolist() if "area" in target
             else [float(mask_util.area(r)) for r in rles])
    labels = _numpy(target["labels"]).tolist()
    iscrowd = _numpy(target["iscrowd"]).tolist() if "iscrowd" in target else [0] * len(labels)
    annotations = [
        {"image_id": image["id"], "category_id": _category_id(meta, label), "segmentation": rle,
         "area": area, "bbox": box, "iscrowd": int(crowd)}
        for label, rle, area, box, crowd in zip(labels, rles, areas, _xywh(target["boxes"]).tolist(),
                                                  iscrowd)
    ]
    return image, annotations


def build_coco(dataset: dict) -> COCO:
    """A pycocotools COCO object over an in-memory instances dict (no file round trip)."""
    coco = COCO()
    coco.dataset = dataset
    with quiet():
        coco.createIndex()
    return coco


def validate_results(results: Any, gt: dict, source: str) -> None:
    """Check a results list against the ground truth before any evaluation work.

    ValueError naming the first entry whose image_id or category_id is not in `gt`.
    """
    if not isinstance(results, list):
        raise ValueError(f"{source}: expected a JSON list of result dicts, got {type(results).__name__}")
    image_ids = {img["id"] for img in gt.get("images", [])}
    category_ids = {cat["id"] for cat in gt.get("categories", [])}
    for index, entry in enumerate(results):
        if not isinstance(entry, dict) or not {"image_id", "category_id", "score"} <= entry.keys():
            raise ValueError(f"{source}: entry {index} is not a dict with image_id, category_id and "
                             f"score: {str(entry)[:200]}")
        if "bbox" not in entry and "segmentation" not in entry:
            raise ValueError(f"{source}: entry {index} has neither bbox nor segmentation")
        image_id, category_id = entry["image_id"], entry["category_id"]
        if image_id not in image_ids:
            raise ValueError(f"{source}: entry {index} (image_id={image_id}, category_id={category_id}) "
                             f"refers to image_id {image_id}, which is not in the ground truth")
        if category_id not in category_ids:
            raise ValueError(f"{source}: entry {index} (image_id={image_id}, category_id={category_id}) "
                             f"refers to category_id {category_id}, which is not in the ground truth")


def _check_options(iou_types: Iterable[str], area_from: str, backend: str = "fast") -> tuple[str, ...]:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}; expected one of {list(BACKENDS)}")
    iou_types = tuple(iou_types)
    bad = [t for t in iou_types if t not in IOU_TYPES]
    if bad or not iou_types:
        raise ValueError(f"iou_types={list(iou_types)}; expected a non-empty subset of {list(IOU_TYPES)}")
    if area_from not in AREA_FROM:
        raise ValueError(f"area_from={area_from!r}; expected one of {list(AREA_FROM)}")
    return iou_types


def prepare_results(results: list[dict], iou_type: str, area_from: str) -> list[dict]:
    """Copies of the results as the evaluation of `iou_type` loads them.

    loadRes and COCOeval set keys of each result dict (id, area, bbox, segmentation) but never
    mutate the values, so shallow copies keep the caller's results intact.
    """
    if iou_type == "segm" and area_from == "mask":
        return [{k: v for k, v in r.items() if k != "bbox"} for r in results]
    return [dict(r) for r in results]


def load_results(coco_gt: COCO, results: list[dict]) -> COCO:
    """`coco_gt.loadRes(results)`, or an empty detection set for empty results."""
    if results:
        with quiet():
            return coco_gt.loadRes(results)
    return build_coco({"images": list(coco_gt.dataset["images"]),
                       "categories": copy.deepcopy(coco_gt.dataset.get("categories", [])),
                       "annotations": []})


def _mean_valid(values: np.ndarray) -> float:
    """COCOeval's mean over entries > -1; -1 when there are none."""
    valid = values[values > -1]
    return float(np.mean(valid)) if valid.size else -1.0


def _percent(value: float) -> float:
    return value * 100 if value >= 0 else math.nan


def summarize_coco(coco_eval: COCOeval, class_names: Sequence[str]) -> dict:
    """The 12 summary numbers (percent, NaN for -1) and per-class AP of an accumulated COCOeval.

    Same numbers as `COCOeval.summarize()` (which reads AP at the last maxDets); per-class AP is
    detectron2's: mean precision over IoUs and recalls, area all, the last maxDets.
    """
    p = coco_eval.params
    precision, recall = coco_eval.eval["precision"], coco_eval.eval["recall"]  # T,R,K,A,M / T,K,A,M
    area = {label: i for i, label in enumerate(p.areaRngLbl)}
    last = len(p.maxDets) - 1
    at50, at75 = np.where(p.iouThrs == 0.5)[0], np.where(p.iouThrs == 0.75)[0]
    stats = {
        "AP": _mean_valid(precision[:, :, :, area["all"], last]),
        "AP50": _mean_valid(precision[at50][:, :, :, area["all"], last]),
        "AP75": _mean_valid(precision[at75][:, :, :, area["all"], last]),
        "APs": _mean_valid(precision[:, :, :, area["small"], last]),
        "APm": _mean_valid(precision[:, :, :, area["medium"], last]),
        "APl": _mean_valid(precision[:, :, :, area["large"], last]),
    }
    for m, max_det in enumerate(p.maxDets):
        stats[f"AR{max_det}"] = _mean_valid(recall[:, :, area["all"], m])
    for key in ("small", "medium", "large"):
        stats[f"AR{key[0]}"] = _mean_valid(recall[:, :, area[key], last])
    metrics: dict[str, Any] = {name: _percent(value) for name, value in stats.items()}
    metrics["per_class"] = {
        name: {"AP": _percent(_mean_valid(precision[:, :, k, area["all"], last]))}
        for k, name in enumerate(class_names)
    }
    return metrics


def category_names(gt: dict) -> list[str]:
    """Names in sorted category-id order, the order of COCOeval's category axis."""
    cats = sorted(gt.get("categories", []), key=lambda c: c["id"])
    return [str(c.get("name", c["id"])) for c in cats]


def evaluate_coco(coco_gt: COCO, results: list[dict], iou_types: Iterable[str] = IOU_TYPES,
                  area_from: str = "mask", max_dets: Sequence[int] = (1, 10, 100),
                  image_ids: Iterable[int] | None = None, backend: str = "fast") -> dict:
    """COCOeval of `results` (COCO result dicts) per IoU type -> {"segm": {...}, "bbox": {...}}.

    image_ids: evaluate only these images (default: every image of the ground truth).
    backend: "fast" (FastCOCOeval) or "pycocotools" (COCOeval); the numbers are the same.
    """
    iou_types = _check_options(iou_types, area_from, backend)
    names = category_names(coco_gt.dataset)
    metrics = {}
    for iou_type in iou_types:
        coco_dt = load_results(coco_gt, prepare_results(results, iou_type, area_from))
        coco_eval = BACKENDS[backend](coco_gt, coco_dt, iou_type)
        coco_eval.params.maxDets = [int(m) for m in max_dets]
        if image_ids is not None:
            coco_eval.params.imgIds = sorted(set(image_ids))
        with quiet():
            coco_eval.evaluate()
            coco_eval.accumulate()
        metrics[iou_type] = summarize_coco(coco_eval, names)
    return metrics


def result_iou_types(results: list[dict]) -> tuple[str, ...]:
    """The IoU types every entry supports: segm needs `segmentation`, bbox needs `bbox`."""
    if not results:
        return IOU_TYPES
    return tuple(t for t, key in (("segm", "segmentation"), ("bbox", "bbox"))
                 if all(key in r for r in results))


def score_coco(gt_json: str | Path, results_json: str | Path, iou_types: Iterable[str] | None = None,
               area_from: str = "bbox", backend: str = "fast") -> dict:
    """Score a COCO results JSON against a COCO instances JSON, as pycocotools does on the file.

    iou_types: None = those every result supports. area_from: "bbox" (pycocotools) or "mask".
    backend: "fast" or "pycocotools" (see `evaluate_coco`).
    """
    _check_options(IOU_TYPES if iou_types is None else iou_types, area_from, backend)
    gt = load_json(gt_json, "ground-truth")
    if not isinstance(gt, dict) or "images" not in gt or "annotations" not in gt:
        raise ValueError(f"ground-truth file {gt_json} is not a COCO instances JSON "
                         "(a dict with images, annotations, categories)")
    results = load_json(results_json, "results")
    validate_results(results, gt, f"results file {results_json}")
    iou_types = result_iou_types(results) if iou_types is None else iou_types
    return evaluate_coco(build_coco(gt), results, iou_types, area_from, backend=backend)


def write_results(results: list[dict], path: str | Path) -> None:
    """The results as a standard COCO results JSON list (`coco_instances_results.json`)."""
    text = json.dumps(results)
    write_atomically(path, lambda f: f.write(text), binary=False)


def _check_mask_size(image: dict, prediction: dict) -> None:
    masks = prediction.get("masks")
    if masks is not None and tuple(masks.shape[-2:]) != (image["height"], image["width"]):
        raise ValueError(
            f"image {image['id']}: predicted masks are {tuple(masks.shape[-2:])} but the image is "
            f"{(image['height'], image['width'])}; predictions must be pasted at the original size"
        )


class InstanceEvaluator(Evaluator):
    """What the COCO and LVIS evaluators share: options, the ground-truth source, results file."""

    def __init__(self, meta: DatasetMeta, gt: str | Path | dict | None, iou_types: Iterable[str],
                 area_from: str, results_path: str | Path | None, backend: str = "fast") -> None:
        super().__init__()
        self.meta = meta
        self.iou_types = _check_options(iou_types, area_from, backend)
        self.area_from = area_from
        self.backend = backend
        self.results_path = Path(results_path) if results_path is not None else None
        if isinstance(gt, (str, Path)) and not Path(gt).is_file():
            raise FileNotFoundError(f"ground-truth file not found: {gt}")
        self._gt_source = gt

    @staticmethod
    def _per_image(batch: dict[str, Any], predictions: Sequence[dict]) -> Iterator[tuple[dict, dict]]:
        """(target, prediction) of each image of a batch; batch["targets"] holds the targets."""
        targets = batch["targets"]
        if len(targets) != len(predictions):
            raise ValueError(f"{len(targets)} targets but {len(predictions)} predictions in a batch")
        return zip(targets, predictions)

    def _write_results(self, results: list[dict]) -> None:
        if self.results_path is not None and is_main_process():
            write_results(results, self.results_path)


class COCOEvaluator(InstanceEvaluator):
    """COCO mask/box AP and AR of instance predictions, gathered across ranks.

    gt: a COCO instances JSON (path or dict) to evaluate against (the processed images only), or
    None to build the ground truth from the batches' targets (crowd regions included; areas from
    `target["area"]` when given, else mask pixel counts — pass the JSON for official numbers).
    results_path: where to write the results JSON (main process only). backend: "fast" or
    "pycocotools" (the same numbers; see `evaluate_coco`).
    """

    def __init__(self, meta: DatasetMeta, gt: str | Path | dict | None = None,
                 iou_types: Iterable[str] = IOU_TYPES, area_from: str = "mask",
                 max_dets: Sequence[int] = (1, 10, 100), results_path: str | Path | None = None,
                 backend: str = "fast") -> None:
        super().__init__(meta, gt, iou_types, area_from, results_path, backend)
        self.max_dets = tuple(int(m) for m in max_dets)
        if len(self.max_dets) != 3:
            raise ValueError(f"max_dets={list(max_dets)}; expected three values as COCO's (1, 10, 100)")
        self._coco_gt: COCO | None = None
        self.reset()

    def reset(self) -> None:
        self._add_list_state("results")
        self._add_list_state("images")
        self._add_list_state("gt_annotations")

    def process(self, batch: dict[str, Any], predictions: Sequence[dict]) -> None:
        """batch["targets"]: per-image target dicts; predictions: per-image prediction dicts."""
        for target, prediction in self._per_image(batch, predictions):
            image_id = int(target["image_id"])
            if self._gt_source is None:
                image, annotations = targets_to_annotations(target, self.meta)
                _check_mask_size(image, prediction)
                self.images.append(image)
                self.gt_annotations.extend(annotations)
            else:
                self.images.append({"id": image_id})
            self.results.extend(predictions_to_results(image_id, prediction, self.meta))

    def _ground_truth(self, state: dict[str, Any]) -> COCO:
        if self._gt_source is None:
            annotations = [{**ann, "id": i + 1} for i, ann in enumerate(state["gt_annotations"])]
            # Things only when the metadata says which they are (Mask R-CNN's label 0 is background).
            labels = self.meta.thing_ids or range(self.meta.num_classes)
            categories = [{"id": _category_id(self.meta, k), "name": self.meta.classes[k]} for k in labels]
            return build_coco({"images": state["images"], "annotations": annotations,
                               "categories": categories})
        if self._coco_gt is None:
            gt = (copy.deepcopy(self._gt_source) if isinstance(self._gt_source, dict)
                  else load_json(self._gt_source, "ground-truth"))
            self._coco_gt = build_coco(gt)
        return self._coco_gt

    def _compute(self, state: dict[str, Any]) -> dict:
        results = state["results"]
        coco_gt = self._ground_truth(state)
        validate_results(results, coco_gt.dataset, "predictions")
        self._write_results(results)
        image_ids = None if self._gt_source is None else [img["id"] for img in state["images"]]
        return evaluate_coco(coco_gt, results, self.iou_types, self.area_from, self.max_dets,
                             image_ids, self.backend)
