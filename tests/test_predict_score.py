"""`segtrain score` on `segtrain predict`'s files: predictions matched to ground-truth images by
file stem when the prediction file names its images (predict numbers images in input order)."""

from __future__ import annotations

import json

import pytest

from segtrain.metrics.coco import results_for_ground_truth, score_coco
from segtrain.metrics.panoptic import _image_pairs, categories_from_json

GT = {"images": [{"id": 139, "file_name": "000139.jpg"}, {"id": 285, "file_name": "000285.jpg"}],
      "annotations": [], "categories": [{"id": 1, "name": "person"}]}


def _result(image_id, **extra):
    return {"image_id": image_id, "category_id": 1, "bbox": [0, 0, 2, 2], "score": 0.5, **extra}


def test_a_plain_results_list_keeps_its_image_ids():
    results = [_result(139), _result(285)]
    assert results_for_ground_truth(results, GT, "r.json") == results


def test_predict_files_are_mapped_to_the_ground_truth_ids_by_stem():
    data = {"images": [{"id": 0, "file_name": "000285.png"}, {"id": 1, "file_name": "000139.png"}],
            "annotations": [_result(0), _result(1), _result(1)]}
    mapped = results_for_ground_truth(data, GT, "instances.json")
    assert [r["image_id"] for r in mapped] == [285, 139, 139]


def test_detections_naming_their_file_are_mapped_without_an_images_list():
    results = [_result(0, file_name="000285.jpg"), _result(7, file_name="000139")]
    assert [r["image_id"] for r in results_for_ground_truth(results, GT, "r.json")] == [285, 139]


def test_images_the_ground_truth_lacks_are_dropped_with_a_warning():
    data = {"images": [{"id": 0, "file_name": "000285.png"}, {"id": 1, "file_name": "000139.png"},
                       {"id": 2, "file_name": "holiday.jpg"}],
            "annotations": [_result(0), _result(2)]}
    with pytest.warns(UserWarning, match="1 predicted images have no ground-truth image.*holiday"):
        mapped = results_for_ground_truth(data, GT, "instances.json")
    assert [r["image_id"] for r in mapped] == [285]


def test_a_ground_truth_image_that_was_not_predicted_is_an_error():
    data = {"images": [{"id": 0, "file_name": "000285.png"}], "annotations": [_result(0)]}
    with pytest.raises(ValueError, match="1 of 2 ground-truth images were not predicted .*000139"):
        results_for_ground_truth(data, GT, "instances.json")


def test_two_ground_truth_images_with_one_stem_are_an_error_naming_both():
    gt = {**GT, "images": [{"id": 1, "file_name": "a/x.jpg"}, {"id": 2, "file_name": "b/x.png"}]}
    with pytest.raises(ValueError, match="a/x.jpg and b/x.png share the stem 'x'"):
        results_for_ground_truth([_result(0, file_name="x.jpg")], gt, "r.json")


def test_something_other_than_results_is_named(tmp_path):
    (tmp_path / "gt.json").write_text(json.dumps(GT))
    (tmp_path / "r.json").write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match="r.json: expected a JSON list of result dicts"):
        score_coco(tmp_path / "gt.json", tmp_path / "r.json")


def _panoptic_case(tmp_path, pred_annotations):
    gt = {"annotations": [{"image_id": 139, "file_name": "000139.png", "segments_info": []},
                          {"image_id": 285, "file_name": "000285.png", "segments_info": []}],
          "categories": [{"id": 1, "name": "person", "isthing": 1}]}
    for folder in ("gt", "pred"):
        (tmp_path / folder).mkdir()
        for name in ("000139.png", "000285.png", "a.png", "b.png"):
            (tmp_path / folder / name).write_bytes(b"")
    return _image_pairs(gt, {"annotations": pred_annotations}, tmp_path / "gt", tmp_path / "pred",
                        categories_from_json(gt, "gt"))


def test_panoptic_predictions_are_paired_by_stem_when_every_image_has_one(tmp_path):
    pairs = _panoptic_case(tmp_path, [{"image_id": 0, "file_name": "000285.png", "segments_info": []},
                                      {"image_id": 1, "file_name": "000139.png", "segments_info": []}])
    assert [(p.gt_png.name, p.pred_png.name) for p in pairs] == [("000139.png", "000139.png"),
                                                                 ("000285.png", "000285.png")]


def test_panoptic_predictions_named_otherwise_are_paired_by_image_id_as_pq_compute_does(tmp_path):
    pairs = _panoptic_case(tmp_path, [{"image_id": 285, "file_name": "a.png", "segments_info": []},
                                      {"image_id": 139, "file_name": "b.png", "segments_info": []}])
    assert [(p.gt_png.name, p.pred_png.name) for p in pairs] == [("000139.png", "b.png"),
                                                                 ("000285.png", "a.png")]
