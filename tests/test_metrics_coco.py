"""COCO evaluator and `score_coco` against pycocotools' COCOeval itself, on generated cases."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from segtrain.data.meta import DatasetMeta, default_palette
from segtrain.metrics.coco import COCOEvaluator, quiet, score_coco

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
CATEGORY_IDS = [1, 3, 7, 10, 12]  # with gaps, as COCO's; 12 never has ground truth


def _blob(rng: np.random.Generator, height: int, width: int, box: list[float]) -> np.ndarray:
    """A random ellipse-ish mask inside box (XYWH), uint8 (H, W)."""
    x, y, w, h = box
    yy, xx = np.mgrid[:height, :width]
    cx, cy = x + w / 2, y + h / 2
    inside = ((xx + 0.5 - cx) / max(w / 2, 1)) ** 2 + ((yy + 0.5 - cy) / max(h / 2, 1)) ** 2 <= 1
    noise = rng.random((height, width)) < 0.9
    return (inside & noise).astype(np.uint8)


def _rle(mask: np.ndarray) -> dict:
    rle = mask_util.encode(np.asfortranarray(mask))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def _uncompressed(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE (counts a list, column-major), as crowd annotations use."""
    flat = mask.flatten(order="F")
    changes = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    counts = np.diff(np.concatenate([[0], changes])).tolist()
    return {"size": list(mask.shape), "counts": counts}


def _random_box(rng: np.random.Generator, height: int, width: int) -> list[float]:
    # Sizes spanning small (< 32^2), medium and large (> 96^2) areas.
    w = float(rng.choice([rng.uniform(4, 30), rng.uniform(30, 90), rng.uniform(90, width - 1)]))
    h = float(rng.choice([rng.uniform(4, 30), rng.uniform(30, 90), rng.uniform(90, height - 1)]))
    w, h = min(w, width - 1), min(h, height - 1)
    x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
    return [round(v, 2) for v in (x, y, w, h)]


def make_case(seed: int, num_images: int = 8) -> tuple[dict, list[dict]]:
    """(COCO instances dict, results list) with crowds, polygons, RLEs and awkward images.

    Image 0 has no ground truth, image 1 no predictions, image 2 over 100 detections; category 12
    appears only in the results; scores are rounded so that ties occur.
    """
    rng = np.random.default_rng(seed)
    images, annotations, results = [], [], []
    for index in range(num_images):
        image_id = 100 + index * 7
        height, width = int(rng.integers(150, 260)), int(rng.integers(150, 260))
        images.append({"id": image_id, "height": height, "width": width, "file_name": f"{image_id}.jpg"})
        gt_masks = []
        for _ in range(0 if index == 0 else int(rng.integers(1, 7))):
            box = _random_box(rng, height, width)
            category = int(rng.choice(CATEGORY_IDS[:-1]))
            crowd = int(rng.random() < 0.15)
            kind = "crowd" if crowd else rng.choice(["polygon", "rle"])
            if kind == "polygon":
                x, y, w, h = box
                polygon = [x, y, x + w, y + 0.3 * h, x + 0.6 * w, y + h, x + 0.1 * w, y + 0.8 * h]
                segmentation: object = [[round(v, 2) for v in polygon]]
                mask = mask_util.decode(mask_util.merge(mask_util.frPyObjects(segmentation, height, width)))
            else:
                mask = _blob(rng, height, width, box)
                segmentation = _uncompressed(mask) if crowd else _rle(mask)
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": category,
                "segmentation": segmentation, "area": float(mask.sum()), "bbox": box, "iscrowd": crowd,
            })
            gt_masks.append((category, mask, box))
        if index == 1:
            continue
        candidates = [(c, m, b) for c, m, b in gt_masks if rng.random() < 0.8]
        for _ in range(150 if index == 2 else int(rng.integers(0, 6))):
            candidates.append((int(rng.choice(CATEGORY_IDS)), None, _random_box(rng, height, width)))
        for category, mask, box in candidates:
            jitter = rng.normal(0, 3, 4)
            det_box = [round(float(v), 2) for v in np.clip(np.array(box) + jitter, 1, None)]
            det_mask = _blob(rng, height, width, det_box) if mask is None else (
                mask & (rng.random(mask.shape) < rng.uniform(0.45, 1.0))).astype(np.uint8)
            results.append({"image_id": image_id, "category_id": category, "bbox": det_box,
                            "score": round(float(rng.random()), 2), "segmentation": _rle(det_mask)})
    categories = [{"id": c, "name": f"cat{c}"} for c in CATEGORY_IDS]
    return {"images": images, "annotations": annotations, "categories": categories}, results


def reference_coco(gt: dict, results: list[dict], iou_type: str, drop_bbox: bool = False) -> COCOeval:
    """Plain pycocotools on fresh copies: COCO, loadRes, evaluate, accumulate, summarize."""
    with quiet():
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(gt)
        coco_gt.createIndex()
        results = copy.deepcopy(results)
        if drop_bbox:
            for r in results:
                r.pop("bbox", None)
        coco_eval = COCOeval(coco_gt, coco_gt.loadRes(results), iou_type)
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return coco_eval


def assert_matches(metrics: dict, coco_eval: COCOeval) -> None:
    """Every summary number equals COCOeval.stats (percent; -1 as NaN), per-class AP detectron2's."""
    for name, value in zip(STAT_NAMES, coco_eval.stats):
        expected = value * 100 if value >= 0 else math.nan
        assert metrics[name] == pytest.approx(expected, abs=1e-6, nan_ok=True), name
    precision = coco_eval.eval["precision"]
    for k, per_class in enumerate(metrics["per_class"].values()):
        p = precision[:, :, k, 0, -1]
        expected = float(np.mean(p[p > -1])) * 100 if (p > -1).any() else math.nan
        assert per_class["AP"] == pytest.approx(expected, abs=1e-6, nan_ok=True)


def _write(tmp_path, gt, results):
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "results.json").write_text(json.dumps(results))
    return tmp_path / "gt.json", tmp_path / "results.json"


@pytest.mark.parametrize(("seed", "backend"), [(0, "fast"), (1, "fast"), (2, "fast"), (0, "pycocotools")])
def test_score_coco_equals_cocoeval_on_generated_cases(tmp_path, seed, backend):
    gt, results = make_case(seed)
    metrics = score_coco(*_write(tmp_path, gt, results), backend=backend)
    assert set(metrics) == {"segm", "bbox"}
    for iou_type in ("segm", "bbox"):
        assert_matches(metrics[iou_type], reference_coco(gt, results, iou_type))
    assert list(metrics["segm"]["per_class"]) == [f"cat{c}" for c in CATEGORY_IDS]
    assert math.isnan(metrics["segm"]["per_class"]["cat12"]["AP"])  # no ground truth


def test_area_from_mask_equals_cocoeval_without_the_boxes(tmp_path):
    gt, results = make_case(3)
    metrics = score_coco(*_write(tmp_path, gt, results), iou_types=["segm"], area_from="mask")
    assert_matches(metrics["segm"], reference_coco(gt, results, "segm", drop_bbox=True))


def _thin_case() -> tuple[dict, list[dict]]:
    """A small object found after a higher-scoring false positive that is thin: small mask, large box."""
    square = np.zeros((200, 200), np.uint8)
    square[10:30, 10:30] = 1
    thin = np.zeros((200, 200), np.uint8)
    thin[50:180, 50:54] = 1  # 520 px of mask, 130 x 130 px of box
    thin[176:180, 50:180] = 1
    gt = {"images": [{"id": 1, "height": 200, "width": 200}],
          "categories": [{"id": 1, "name": "thing"}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": _rle(square),
                           "area": 400.0, "bbox": [10, 10, 20, 20], "iscrowd": 0}]}
    results = [
        {"image_id": 1, "category_id": 1, "score": 0.9, "segmentation": _rle(thin),
         "bbox": [50, 50, 130, 130]},
        {"image_id": 1, "category_id": 1, "score": 0.5, "segmentation": _rle(square),
         "bbox": [10, 10, 20, 20]},
    ]
    return gt, results


def test_area_conventions_differ_when_mask_and_box_areas_fall_in_different_ranges(tmp_path):
    gt, results = _thin_case()
    paths = _write(tmp_path, gt, results)
    by_box = score_coco(*paths, iou_types=["segm"], area_from="bbox")["segm"]
    by_mask = score_coco(*paths, iou_types=["segm"], area_from="mask")["segm"]
    assert_matches(by_box, reference_coco(gt, results, "segm"))
    assert_matches(by_mask, reference_coco(gt, results, "segm", drop_bbox=True))
    # By box area the false positive is large, so it is ignored in the small range.
    assert by_box["APs"] == pytest.approx(100.0)
    assert by_mask["APs"] == pytest.approx(50.0)


def test_empty_results_score_zero_where_there_is_ground_truth(tmp_path):
    gt, _ = make_case(4)
    metrics = score_coco(*_write(tmp_path, gt, []))
    # COCOeval on a detection it never looks at (an unevaluated category) is COCOeval on nothing.
    gt_extra = copy.deepcopy(gt)
    dummy = [{"image_id": gt["images"][0]["id"], "category_id": 999, "bbox": [0, 0, 5, 5], "score": 1.0,
              "segmentation": _rle(np.ones((gt["images"][0]["height"], gt["images"][0]["width"]), np.uint8))}]
    for iou_type in ("segm", "bbox"):
        assert_matches(metrics[iou_type], reference_coco(gt_extra, dummy, iou_type))
    assert metrics["segm"]["AP"] == 0.0


def test_no_ground_truth_at_all_gives_nan_not_a_crash(tmp_path):
    gt, results = make_case(5)
    gt["annotations"] = []
    metrics = score_coco(*_write(tmp_path, gt, results))
    assert all(math.isnan(metrics["segm"][name]) for name in STAT_NAMES)


@pytest.mark.parametrize("field, value, message", [
    ("image_id", 4242, "entry 3 (image_id=4242"),
    ("category_id", 99, "category_id 99"),
])
def test_results_with_unknown_ids_name_the_first_offending_entry(tmp_path, field, value, message):
    gt, results = make_case(6)
    results[3][field] = value
    results[5][field] = value
    gt_path, results_path = _write(tmp_path, gt, results)
    with pytest.raises(ValueError, match="entry 3 ") as err:
        score_coco(gt_path, results_path)
    assert message in str(err.value) and str(results_path) in str(err.value)


def test_missing_and_malformed_files_are_named(tmp_path):
    gt_path, results_path = _write(tmp_path, *make_case(7, num_images=2))
    with pytest.raises(FileNotFoundError, match="nope.json"):
        score_coco(gt_path, tmp_path / "nope.json")
    results_path.write_text("[{oops")
    with pytest.raises(ValueError, match="results.json is not valid JSON"):
        score_coco(gt_path, results_path)


def _as_tensors(gt: dict, results: list[dict]) -> tuple[list[dict], list[dict]]:
    """The case as the instance task hands it to the evaluator: targets and predictions per image."""
    coco = COCO()
    coco.dataset = copy.deepcopy(gt)
    with quiet():
        coco.createIndex()
    targets, predictions = [], []
    for image in gt["images"]:
        anns = coco.imgToAnns[image["id"]]
        dets = [r for r in results if r["image_id"] == image["id"]]
        size = (image["height"], image["width"])
        targets.append({
            "image_id": image["id"], "orig_size": torch.tensor(size),
            "masks": torch.from_numpy(np.stack([coco.annToMask(a) for a in anns]).astype(bool)
                                      if anns else np.zeros((0, *size), bool)),
            "boxes": torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)],
                                  dtype=torch.float64).reshape(-1, 4),
            "labels": torch.tensor([CATEGORY_IDS.index(a["category_id"]) for a in anns], dtype=torch.int64),
            "iscrowd": torch.tensor([a["iscrowd"] for a in anns], dtype=torch.int64),
            "area": torch.tensor([a["area"] for a in anns], dtype=torch.float64),
        })
        predictions.append({
            "masks": torch.from_numpy(np.stack([mask_util.decode(d["segmentation"]) for d in dets])
                                      if dets else np.zeros((0, *size), np.uint8)),
            "boxes": torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (d["bbox"] for d in dets)],
                                  dtype=torch.float64).reshape(-1, 4),
            "labels": torch.tensor([CATEGORY_IDS.index(d["category_id"]) for d in dets], dtype=torch.int64),
            "scores": torch.tensor([d["score"] for d in dets], dtype=torch.float64),
        })
    return targets, predictions


META = DatasetMeta([f"cat{c}" for c in CATEGORY_IDS], default_palette(len(CATEGORY_IDS)),
                   category_ids=CATEGORY_IDS)


def _xyxy_to_xywh_roundtrip(results: list[dict]) -> list[dict]:
    """The results as the evaluator writes them (boxes through XYXY and back)."""
    out = copy.deepcopy(results)
    for r in out:
        x, y, w, h = r["bbox"]
        r["bbox"] = [x, y, (x + w) - x, (y + h) - y]
    return out


def test_evaluator_on_tensors_equals_cocoeval_on_the_json(tmp_path):
    gt, results = make_case(8, num_images=5)
    targets, predictions = _as_tensors(gt, results)
    evaluator = COCOEvaluator(META, results_path=tmp_path / "coco_instances_results.json")
    for start in range(0, len(targets), 2):
        evaluator.process(targets[start:start + 2], [{"instances": p} for p in predictions[start:start + 2]])
    metrics = evaluator.compute()
    written = json.loads((tmp_path / "coco_instances_results.json").read_text())
    assert len(written) == len(results)
    expected = _xyxy_to_xywh_roundtrip(results)
    gt_boxes = dict(gt, annotations=_xyxy_to_xywh_roundtrip(gt["annotations"]))
    assert_matches(metrics["segm"], reference_coco(gt_boxes, expected, "segm", drop_bbox=True))
    assert_matches(metrics["bbox"], reference_coco(gt_boxes, expected, "bbox"))
    # Scoring the written file with the mask-area convention gives the evaluator's numbers.
    gt_path = tmp_path / "gt.json"
    gt_path.write_text(json.dumps(gt))
    rescored = score_coco(gt_path, tmp_path / "coco_instances_results.json", area_from="mask")
    assert rescored["segm"]["AP"] == pytest.approx(metrics["segm"]["AP"], abs=1e-9)


def test_evaluator_with_a_gt_json_evaluates_only_the_processed_images(tmp_path):
    gt, results = make_case(9, num_images=6)
    targets, predictions = _as_tensors(gt, results)
    evaluator = COCOEvaluator(META, gt=gt, iou_types=["segm"])
    evaluator.process(targets[:4], [{"instances": p} for p in predictions[:4]])
    subset = {image["id"] for image in gt["images"][:4]}
    sub_gt = dict(gt, images=gt["images"][:4], annotations=[a for a in gt["annotations"]
                                                            if a["image_id"] in subset])
    sub_results = _xyxy_to_xywh_roundtrip([r for r in results if r["image_id"] in subset])
    assert_matches(evaluator.compute()["segm"], reference_coco(sub_gt, sub_results, "segm", drop_bbox=True))
    evaluator.reset()
    assert evaluator.results == [] and evaluator.images == []


def test_target_masks_not_at_the_original_size_are_refused():
    evaluator = COCOEvaluator(META)
    target = {"image_id": 1, "orig_size": torch.tensor([20, 30]),
              "masks": torch.zeros(1, 10, 10, dtype=torch.bool), "boxes": torch.zeros(1, 4),
              "labels": torch.zeros(1, dtype=torch.int64),
              "iscrowd": torch.zeros(1, dtype=torch.int64)}
    prediction = {"masks": torch.zeros(0, 20, 30), "boxes": torch.zeros(0, 4),
                  "labels": torch.zeros(0, dtype=torch.int64), "scores": torch.zeros(0)}
    with pytest.raises(ValueError, match="original image size"):
        evaluator.process([target], [{"instances": p} for p in [prediction]])


def test_categories_built_from_targets_are_the_things_when_metadata_names_them():
    meta = DatasetMeta(["background", "cat", "dog"], default_palette(3), thing_ids=[1, 2], stuff_ids=[0],
                       category_ids=[0, 17, 18])
    evaluator = COCOEvaluator(meta)
    mask = torch.zeros(1, 40, 40, dtype=torch.bool)
    mask[0, 5:25, 5:25] = True
    box = torch.tensor([[5.0, 5.0, 25.0, 25.0]])
    target = {"image_id": 1, "orig_size": torch.tensor([40, 40]), "masks": mask, "boxes": box,
              "labels": torch.tensor([2]), "iscrowd": torch.tensor([0])}
    prediction = {"masks": mask, "boxes": box, "labels": torch.tensor([2]), "scores": torch.tensor([0.8])}
    evaluator.process([target], [{"instances": p} for p in [prediction]])
    metrics = evaluator.compute()
    assert list(metrics["segm"]["per_class"]) == ["cat", "dog"]
    assert metrics["segm"]["AP"] == pytest.approx(100.0) and metrics["bbox"]["AP"] == pytest.approx(100.0)


def test_an_unknown_backend_is_named(tmp_path):
    gt, results = make_case(0, num_images=2)
    with pytest.raises(ValueError, match="backend='cocoapi'.*'fast', 'pycocotools'"):
        score_coco(*_write(tmp_path, gt, results), backend="cocoapi")


def test_per_class_ap_is_saved_as_csv_beside_the_results(tmp_path):
    import csv

    from segtrain.data.datasets.synthetic import SyntheticDataset

    data = SyntheticDataset(split="val", num_samples=3, image_size=48, num_classes=4)
    evaluator = COCOEvaluator(data.meta, results_path=tmp_path / "coco_instances_results.json")
    for i in range(3):
        _, target = data[i]
        keep = torch.arange(len(target["labels"])) % 2 == 0  # half the objects found, perfectly
        found = {"masks": target["masks"][keep].bool(), "boxes": target["boxes"][keep].float(),
                 "labels": target["labels"][keep], "scores": torch.ones(int(keep.sum()))}
        evaluator.process([target], [{"instances": found}])
    metrics = evaluator.compute()
    rows = list(csv.reader((tmp_path / "coco_per_class_ap.csv").open()))
    assert rows[0] == ["class", "segm AP", "bbox AP"]
    table = {row[0]: row[1:] for row in rows[1:]}
    assert set(table) == set(metrics["segm"]["per_class"])
    for name, (segm, bbox) in table.items():
        for value, family in ((segm, "segm"), (bbox, "bbox")):
            expected = metrics[family]["per_class"][name]["AP"]
            assert (value == "" and math.isnan(expected)) or float(value) == pytest.approx(expected,
                                                                                          abs=1e-4)
    assert any(0 < float(v) < 100 for v, _ in table.values() if v), "the test needs a partial AP"
