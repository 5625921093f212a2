"""FastCOCOeval's precision/recall/scores arrays against pycocotools' COCOeval, exactly."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from test_metrics_coco import make_case

from segtrain.metrics.coco import build_coco, load_results, quiet
from segtrain.metrics.fast_cocoeval import FastCOCOeval


def _run(cls: type, gt: dict, results: list[dict], iou_type: str, max_dets: list[int] | None = None,
         image_ids: list[int] | None = None) -> COCOeval:
    with quiet():
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(gt)
        coco_gt.createIndex()
        coco_eval = cls(coco_gt, coco_gt.loadRes(copy.deepcopy(results)), iou_type)
        if max_dets is not None:
            coco_eval.params.maxDets = max_dets
        if image_ids is not None:
            coco_eval.params.imgIds = image_ids
        coco_eval.evaluate()
        coco_eval.accumulate()
    return coco_eval


def assert_same_arrays(gt: dict, results: list[dict], iou_type: str, **options) -> COCOeval:
    reference = _run(COCOeval, gt, results, iou_type, **options)
    fast = _run(FastCOCOeval, gt, results, iou_type, **options)
    for key in ("precision", "recall", "scores"):
        np.testing.assert_array_equal(fast.eval[key], reference.eval[key], err_msg=key)
    return reference


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("iou_type", ["segm", "bbox"])
def test_generated_cases_give_cocoevals_arrays(seed, iou_type):
    gt, results = make_case(seed)
    reference = assert_same_arrays(gt, results, iou_type)
    assert (reference.eval["precision"] > 0).any()  # the case has true positives to agree on


def test_segm_without_boxes_uses_mask_areas_identically():
    gt, results = make_case(7)
    assert_same_arrays(gt, [{k: v for k, v in r.items() if k != "bbox"} for r in results], "segm")


def _grid_case(seed: int) -> tuple[dict, list[dict]]:
    """Boxes on a coarse integer grid: exact IoU ties, identical duplicates, crowd regions matched
    many times, areas exactly on the 32^2 / 96^2 range edges, tied scores, a GT id 0."""
    rng = np.random.default_rng(seed)
    edges = [8, 16, 32, 48, 96, 128]
    images, annotations, results = [], [], []
    for index in range(6):
        image_id = index + 1
        images.append({"id": image_id, "height": 400, "width": 400})
        boxes = []
        for _ in range(int(rng.integers(0, 8))):
            w, h = (float(rng.choice(edges)) for _ in range(2))
            x, y = (float(rng.integers(0, 4) * 16) for _ in range(2))
            box = [x, y, w, h]
            boxes.append(box)
            copies = 2 if rng.random() < 0.3 else 1  # an identical duplicate: a perfect tie
            for _ in range(copies):
                annotations.append({"id": len(annotations), "image_id": image_id, "bbox": box,
                                    "category_id": int(rng.integers(1, 4)), "area": w * h,
                                    "iscrowd": int(rng.random() < 0.2)})
        for _ in range(int(rng.integers(0, 14))):
            if boxes and rng.random() < 0.7:
                x, y, w, h = boxes[int(rng.integers(len(boxes)))]
                box = [x + float(rng.choice([0, 0, 8, -8])), y, w, h + float(rng.choice([0, 16]))]
            else:
                box = [float(v) for v in rng.integers(0, 200, 2)] + [float(rng.choice(edges))] * 2
            results.append({"image_id": image_id, "category_id": int(rng.integers(1, 4)), "bbox": box,
                            "score": float(rng.choice([0.3, 0.5, 0.9]))})
    categories = [{"id": c, "name": f"c{c}"} for c in (1, 2, 3)]
    return {"images": images, "annotations": annotations, "categories": categories}, results


@pytest.mark.parametrize("seed", range(12))
def test_ties_duplicates_crowds_and_range_edges_give_cocoevals_arrays(seed):
    gt, results = _grid_case(seed)
    assert_same_arrays(gt, results, "bbox")
    assert_same_arrays(gt, results, "bbox", max_dets=[1, 2, 3])  # truncation inside images


def test_image_subset_and_a_category_without_detections():
    gt, results = _grid_case(3)
    assert_same_arrays(gt, results, "bbox", image_ids=[2, 4, 5])
    assert_same_arrays(gt, [r for r in results if r["category_id"] != 2], "bbox")


def test_no_detections_at_all():
    gt, _ = _grid_case(3)
    arrays = {}
    for cls in (COCOeval, FastCOCOeval):
        coco_gt = build_coco(copy.deepcopy(gt))
        coco_eval = cls(coco_gt, load_results(coco_gt, []), "bbox")
        with quiet():
            coco_eval.evaluate()
            coco_eval.accumulate()
        arrays[cls] = coco_eval.eval
    for key in ("precision", "recall", "scores"):
        np.testing.assert_array_equal(arrays[FastCOCOeval][key], arrays[COCOeval][key])
    assert (arrays[COCOeval]["recall"] == 0).any()


def test_unmatched_detections_can_be_ignored_per_pair():
    class IgnoreAll(FastCOCOeval):
        def ignores_unmatched(self, image_id, category_id):
            return True

    gt, results = _grid_case(5)
    coco_eval = _run(IgnoreAll, gt, results, "bbox")
    reference = _run(COCOeval, gt, results, "bbox")
    # Without false positives precision can only rise, and somewhere it does.
    valid = reference.eval["precision"] > -1
    assert (coco_eval.eval["precision"][valid] >= reference.eval["precision"][valid]).all()
    assert (coco_eval.eval["precision"][valid] > reference.eval["precision"][valid]).any()


def test_keypoints_are_refused():
    gt, results = _grid_case(1)
    with quiet():
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        coco_eval = FastCOCOeval(coco_gt, coco_gt.loadRes(results), "bbox")
    coco_eval.params.iouType = "keypoints"
    with pytest.raises(ValueError, match="keypoints"):
        coco_eval.evaluate()


def test_an_iou_tie_goes_to_the_last_ground_truth_as_in_cocoeval():
    # d1 overlaps A and B equally (IoU 0.6 each); taking B (the last) leaves A for d2: two hits.
    gt = {"images": [{"id": 1, "height": 50, "width": 50}], "categories": [{"id": 1, "name": "x"}],
          "annotations": [{"id": i + 1, "image_id": 1, "category_id": 1, "bbox": box, "area": 100.0,
                           "iscrowd": 0} for i, box in enumerate([[0, 0, 10, 10], [5, 0, 10, 10]])]}
    results = [{"image_id": 1, "category_id": 1, "bbox": [2.5, 0, 10, 10], "score": 0.9},
               {"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "score": 0.8}]
    reference = assert_same_arrays(gt, results, "bbox")
    assert reference.eval["recall"][0, 0, 0, -1] == 1.0  # at IoU 0.5 both ground truths are found
