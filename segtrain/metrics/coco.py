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
import csv
import io
import json
import math
import warnings
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


def results_for_ground_truth(data: Any, gt: dict, source: str) -> list[dict]:
    """The detections of a results file, with image ids of the ground truth.

    data: a COCO results list, or a dict whose `annotations` are the detections and `images`
    ({id, file_name}) the predicted images (`segtrain predict`'s instances.json). Where the file
    names its images (`images`, or a `file_name` in each detection), they are matched to the
    ground truth's by file stem ("a.jpg" ~ "a.png" ~ "a") and the ids replaced by the ground
    truth's: `predict` numbers images in its input order. Detections of images the ground truth
    lacks are dropped with a warning; with an `images` list, a ground-truth image it lacks is a
    ValueError (its detections would silently count as none). Without file names (or when the
    ground truth has none) the ids are used as given, as pycocotools does.
    """
    if isinstance(data, dict) and isinstance(data.get("annotations"), list):
        results, images = data["annotations"], data.get("images")
    elif isinstance(data, list):
        results, images = data, None
    else:
        raise ValueError(f"{source}: expected a JSON list of result dicts (COCO results), or a dict "
                         f"with `annotations` (segtrain predict's instances.json); got {type(data).__name__}")
    names = _predicted_stems(results, images if isinstance(images, list) else [], source)
    gt_ids = _ground_truth_ids_by_stem(gt) if names else None
    if gt_ids is None:
        return results
    if all(gt_ids.get(stem) == image_id for image_id, stem in names.items()):
        return results  # already the ground truth's ids
    unknown = {stem for stem in names.values() if stem not in gt_ids}
    if unknown:
        warnings.warn(f"{source}: {len(unknown)} predicted images have no ground-truth image of the same "
                      f"file stem; their detections are ignored, e.g. {', '.join(sorted(unknown)[:5])}",
                      stacklevel=2)
    if isinstance(images, list):
        predicted = set(names.values())
        missing = [stem for stem in gt_ids if stem not in predicted]
        if missing:
            raise ValueError(f"{source}: {len(missing)} of {len(gt_ids)} ground-truth images were not "
                             f"predicted (matched by file stem), e.g. {', '.join(missing[:5])}; predict "
                             "every image of the ground truth")
    return [{**r, "image_id": gt_ids[names[r["image_id"]]]} if r.get("image_id") in names else r
            for r in results if names.get(r.get("image_id")) not in unknown]


def _predicted_stems(results: list, images: list, source: str) -> dict[Any, str]:
    """Image id -> file stem, from `images` entries and from detections carrying `file_name`."""
    from segtrain.data.codecs.file_names import image_stem

    names: dict[Any, str] = {}
    entries = [*images, *({"id": r["image_id"], "file_name": r["file_name"]} for r in results
                          if isinstance(r, dict) and "file_name" in r and "image_id" in r)]
    for entry in entries:
        if not isinstance(entry, dict) or "file_name" not in entry or "id" not in entry:
            continue
        stem = image_stem(entry["file_name"])
        if names.setdefault(entry["id"], stem) != stem:
            raise ValueError(f"{source}: image_id {entry['id']} is named both {names[entry['id']]} "
                             f"and {stem}; expected one file per image id")
    return names


def _ground_truth_ids_by_stem(gt: dict) -> dict[str, Any] | None:
    """File stem -> image id of the ground truth; None when an image has no file_name.
    ValueError naming both when two images share a stem (file names could not tell them apart)."""
    from segtrain.data.codecs.file_names import image_stem

    ids: dict[str, Any] = {}
    files: dict[str, str] = {}
    for image in gt.get("images", []):
        if "file_name" not in image:
            return None
        stem = image_stem(image["file_name"])
        if stem in ids:
            raise ValueError(f"the ground truth's images {files[stem]} and {image['file_name']} share "
                             f"the stem {stem!r}; predictions cannot be matched to them by file name")
        ids[stem], files[stem] = image["id"], image["file_name"]
    return ids


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
    source = f"results file {results_json}"
    results = results_for_ground_truth(load_json(results_json, "results"), gt, source)
    validate_results(results, gt, source)
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


INSTANCE_EVALUATOR_NAMES = "coco/lvis"


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
    def _per_image(targets: Sequence[dict], predictions: Sequence[dict]) -> Iterator[tuple[dict, dict]]:
        """(target, predicted instances) of each image of a batch."""
        if len(targets) != len(predictions):
            raise ValueError(f"{len(targets)} targets but {len(predictions)} predictions in a batch")
        for target, prediction in zip(targets, predictions):
            if "instances" not in prediction:
                raise KeyError(f"the {INSTANCE_EVALUATOR_NAMES} evaluators read `instances` "
                               f"predictions; got keys {sorted(prediction)}")
            yield target, prediction["instances"]

    def _write_results(self, results: list[dict]) -> None:
        if self.results_path is not None and is_main_process():
            write_results(results, self.results_path)

    def _write_per_class(self, metrics: dict) -> dict:
        """Beside the results JSON, `<name>_per_class_ap.csv`: one row per class, its AP per IoU
        type (segm, bbox), as the metrics' per_class tables; returns `metrics`."""
        if self.results_path is None or not is_main_process():
            return metrics
        families = [f for f in ("segm", "bbox") if "per_class" in metrics.get(f, {})]
        names = list(dict.fromkeys(n for f in families for n in metrics[f]["per_class"]))
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["class", *(f"{f} AP" for f in families)])
        for name in names:
            values = [metrics[f]["per_class"].get(name, {}).get("AP") for f in families]
            writer.writerow([name, *("" if v is None or v != v else f"{v:.4f}" for v in values)])
        prefix = self.results_path.name.split("_instances_results")[0]
        text = buffer.getvalue()
        write_atomically(self.results_path.parent / f"{prefix}_per_class_ap.csv", lambda f: f.write(text),
                         binary=False)
        return metrics


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

    def process(self, targets: Sequence[dict], predictions: Sequence[dict]) -> None:
        """targets: per-image target dicts; predictions: per-image dicts with `instances`."""
        for target, prediction in self._per_image(targets, predictions):
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
        return self._write_per_class(evaluate_coco(coco_gt, results, self.iou_types, self.area_from,
                                                   self.max_dets, image_ids, self.backend))

