"""LVIS evaluation against the `lvis` package's LVISEval itself, on generated federated cases.

LVISEval (lvis 0.5.3) needs `np.float` back and imports opencv and matplotlib for its visualiser
only: the fixture restores the alias and stubs those modules for the duration of a test.
"""

from __future__ import annotations

import copy
import json
import math
import sys
import types

import numpy as np
import pytest
from test_metrics_coco import _as_tensors, _rle, _xyxy_to_xywh_roundtrip, make_case

from segtrain.data.meta import DatasetMeta, default_palette
from segtrain.metrics.coco import quiet
from segtrain.metrics.lvis import LVISEvaluator, score_lvis

CATEGORY_IDS = [1, 3, 7, 10, 12]
FREQUENCY = {1: "f", 3: "c", 7: "r", 10: "f", 12: "r"}
LVIS_NAMES = {"AP": "AP", "AP50": "AP50", "AP75": "AP75", "APs": "APs", "APm": "APm", "APl": "APl",
              "APr": "APr", "APc": "APc", "APf": "APf", "AR300": "AR@300", "ARs": "ARs@300",
              "ARm": "ARm@300", "ARl": "ARl@300"}


@pytest.fixture
def lvis_api(monkeypatch):
    """The reference `lvis` package, importable and working on current NumPy."""
    monkeypatch.setattr(np, "float", float, raising=False)
    for name in ("cv2", "matplotlib", "matplotlib.pyplot", "matplotlib.patches"):
        if name not in sys.modules:
            stub = types.ModuleType(name)
            stub.Polygon = object
            monkeypatch.setitem(sys.modules, name, stub)
    return pytest.importorskip("lvis", reason="the reference: pip install --no-deps lvis==0.5.3")


def make_lvis_case(seed: int, num_images: int = 8) -> tuple[dict, list[dict]]:
    """The COCO case made federated: no crowds, negative and not-exhaustive lists per image,
    one image with more than 300 detections, some detections of zero area, an `ignore`d annotation."""
    gt, results = make_case(seed, num_images)
    rng = np.random.default_rng(seed + 100)
    for ann in gt["annotations"]:
        ann.pop("iscrowd")
        if isinstance(ann["segmentation"], dict) and isinstance(ann["segmentation"]["counts"], list):
            ann["segmentation"] = {"size": ann["segmentation"]["size"], "counts": _rle(
                _decode_uncompressed(ann["segmentation"]))["counts"]}
    gt["annotations"][-1]["ignore"] = 1
    for cat in gt["categories"]:
        cat["frequency"] = FREQUENCY[cat["id"]]
    for image in gt["images"]:
        present = {a["category_id"] for a in gt["annotations"] if a["image_id"] == image["id"]}
        absent = [c for c in CATEGORY_IDS if c not in present]
        image["neg_category_ids"] = [c for c in absent if rng.random() < 0.5]
        image["not_exhaustive_category_ids"] = [c for c in present if rng.random() < 0.3]
    crowded = gt["images"][3]
    extra = [{"image_id": crowded["id"], "category_id": int(rng.choice(CATEGORY_IDS)),
              "bbox": [float(v) for v in rng.uniform(0, 60, 4).round(1)],
              "score": round(float(rng.random()), 2),
              "segmentation": _rle(_box_mask(crowded, rng))} for _ in range(320)]
    extra[0]["bbox"][2] = 0.0  # zero box area
    extra[1]["segmentation"] = _rle(np.zeros((crowded["height"], crowded["width"]), np.uint8))
    return gt, results + extra


def _box_mask(image: dict, rng: np.random.Generator) -> np.ndarray:
    mask = np.zeros((image["height"], image["width"]), np.uint8)
    x, y = rng.integers(0, 100, 2)
    mask[y:y + rng.integers(2, 50), x:x + rng.integers(2, 50)] = 1
    return mask


def _decode_uncompressed(rle: dict) -> np.ndarray:
    height, width = rle["size"]
    values = np.repeat(np.arange(len(rle["counts"])) % 2, rle["counts"]).astype(np.uint8)
    return values.reshape(width, height).T.copy()


def reference_lvis(lvis_api, tmp_path, gt: dict, results: list[dict], iou_type: str, drop_bbox: bool = False):
    path = tmp_path / "lvis_gt_reference.json"
    path.write_text(json.dumps(gt))
    results = copy.deepcopy(results)
    if drop_bbox:
        for r in results:
            r.pop("bbox", None)
    with quiet():
        lvis_eval = lvis_api.LVISEval(lvis_api.LVIS(str(path)), results, iou_type)
        lvis_eval.run()
    return lvis_eval


def assert_matches(metrics: dict, lvis_eval) -> None:
    for ours, theirs in LVIS_NAMES.items():
        value = lvis_eval.results[theirs]
        expected = value * 100 if value >= 0 else math.nan
        assert metrics[ours] == pytest.approx(expected, abs=1e-6, nan_ok=True), ours
    precision = lvis_eval.eval["precision"]
    for k, per_class in enumerate(metrics["per_class"].values()):
        p = precision[:, :, k, 0]
        expected = float(np.mean(p[p > -1])) * 100 if (p > -1).any() else math.nan
        assert per_class["AP"] == pytest.approx(expected, abs=1e-6, nan_ok=True)


def _write(tmp_path, gt, results):
    (tmp_path / "lvis.json").write_text(json.dumps(gt))
    (tmp_path / "results.json").write_text(json.dumps(results))
    return tmp_path / "lvis.json", tmp_path / "results.json"


@pytest.mark.parametrize(("seed", "backend"), [(0, "fast"), (1, "fast"), (2, "fast"), (0, "pycocotools")])
def test_score_lvis_equals_lvis_eval_on_generated_cases(lvis_api, tmp_path, seed, backend):
    gt, results = make_lvis_case(seed)
    metrics = score_lvis(*_write(tmp_path, gt, results), backend=backend)
    for iou_type in ("segm", "bbox"):
        assert_matches(metrics[iou_type], reference_lvis(lvis_api, tmp_path, gt, results, iou_type))
    assert not math.isnan(metrics["segm"]["APr"]) and not math.isnan(metrics["segm"]["APf"])


def test_score_lvis_with_mask_areas_equals_lvis_eval_without_the_boxes(lvis_api, tmp_path):
    gt, results = make_lvis_case(3)
    metrics = score_lvis(*_write(tmp_path, gt, results), iou_types=["segm"], area_from="mask")
    assert_matches(metrics["segm"], reference_lvis(lvis_api, tmp_path, gt, results, "segm", drop_bbox=True))


def test_only_the_top_300_detections_per_image_count(tmp_path):
    gt, results = make_lvis_case(4)
    crowded = gt["images"][3]["id"]
    ranked = sorted((r for r in results if r["image_id"] == crowded), key=lambda r: r["score"], reverse=True)
    kept = [r for r in results if r["image_id"] != crowded or any(r is k for k in ranked[:300])]
    assert len(kept) < len(results)
    full = score_lvis(*_write(tmp_path, gt, results))
    assert score_lvis(*_write(tmp_path, gt, kept)) == full


def test_detections_of_unverified_categories_are_not_penalised(tmp_path):
    gt, results = make_lvis_case(5)
    image = gt["images"][0]  # no ground truth: only its negative categories are evaluated
    unverified = [c for c in CATEGORY_IDS if c not in image["neg_category_ids"]]
    box = {"image_id": image["id"], "bbox": [1.0, 1.0, 40.0, 40.0], "score": 0.99,
           "segmentation": _rle(np.ones((image["height"], image["width"]), np.uint8))}
    before = score_lvis(*_write(tmp_path, gt, results))
    after = score_lvis(*_write(tmp_path, gt, results + [dict(box, category_id=c) for c in unverified]))
    assert after == before


def test_empty_results_score_zero_like_lvis_eval_on_a_filtered_out_detection(lvis_api, tmp_path):
    gt, _ = make_lvis_case(6)
    metrics = score_lvis(*_write(tmp_path, gt, []))
    image = gt["images"][0]
    outside = next(c for c in CATEGORY_IDS if c not in image["neg_category_ids"])
    dummy = [{"image_id": image["id"], "category_id": outside, "bbox": [1.0, 1.0, 5.0, 5.0], "score": 1.0,
              "segmentation": _rle(np.ones((image["height"], image["width"]), np.uint8))}]
    for iou_type in ("segm", "bbox"):
        assert_matches(metrics[iou_type], reference_lvis(lvis_api, tmp_path, gt, dummy, iou_type))
    assert metrics["segm"]["AP"] == 0.0


def test_unknown_category_names_the_entry(tmp_path):
    gt, results = make_lvis_case(7, num_images=4)
    results[2]["category_id"] = 555
    with pytest.raises(ValueError, match=r"entry 2 \(image_id=.*category_id=555\)"):
        score_lvis(*_write(tmp_path, gt, results))


def test_evaluator_on_tensors_equals_lvis_eval(lvis_api, tmp_path):
    gt, results = make_lvis_case(8, num_images=5)
    meta = DatasetMeta([f"cat{c}" for c in CATEGORY_IDS], default_palette(len(CATEGORY_IDS)),
                       category_ids=CATEGORY_IDS)
    coco_style = copy.deepcopy(gt)
    for ann in coco_style["annotations"]:
        ann["iscrowd"] = 0
    targets, predictions = _as_tensors(coco_style, results)
    gt_path, _ = _write(tmp_path, gt, [])
    evaluator = LVISEvaluator(meta, gt=gt_path, results_path=tmp_path / "lvis_results.json")
    evaluator.process(targets[:3], [{"instances": p} for p in predictions[:3]])
    evaluator.process(targets[3:], [{"instances": p} for p in predictions[3:]])
    metrics = evaluator.compute()
    expected = _xyxy_to_xywh_roundtrip(results)
    assert_matches(metrics["segm"], reference_lvis(lvis_api, tmp_path, gt, expected, "segm", drop_bbox=True))
    assert_matches(metrics["bbox"], reference_lvis(lvis_api, tmp_path, gt, expected, "bbox"))
    assert len(json.loads((tmp_path / "lvis_results.json").read_text())) == len(results)
