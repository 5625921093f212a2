"""PQ (`segtrain.metrics.panoptic`) against panopticapi's own pq_compute, on generated and real cases."""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli, score_loads_torch
from PIL import Image, PngImagePlugin

from segtrain.data.meta import DatasetMeta, default_palette
from segtrain.metrics.panoptic import PanopticEvaluator, read_panoptic_png, score_panoptic

pq_evaluation = pytest.importorskip("panopticapi.evaluation",
                                    reason="panopticapi-lite (make test installs it)")

THINGS = [1, 3, 5, 13]  # 13 never has ground truth: predicted only
STUFF = [7, 9, 11, 15]  # 15 never appears anywhere
CATEGORIES = [{"id": c, "name": f"cat{c}", "isthing": int(c in THINGS)} for c in sorted(THINGS + STUFF)]
FIXTURES = (Path(__file__).parents[1] / ".." / "shared" / "fixtures").resolve()
SAMPLE = FIXTURES / "coco_panoptic_sample" / "sample_data"


# ----------------------------------------------------------------------------- case writing


def id_to_rgb(ids: np.ndarray) -> np.ndarray:
    return np.stack([(ids >> s) & 255 for s in (0, 8, 16)], axis=-1).astype(np.uint8)


def write_image(folder: Path, name: str, ids: np.ndarray, categories: dict[int, int],
                crowd: set[int] = frozenset(), unlisted: set[int] = frozenset()) -> dict:
    """Write one panoptic PNG; its annotation lists every non-zero id present (areas = pixel counts)
    except `unlisted`, with category `categories[id]`."""
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(id_to_rgb(ids)).save(folder / f"{name}.png")
    present, counts = np.unique(ids, return_counts=True)
    segments = [{"id": int(i), "category_id": int(categories[int(i)]), "area": int(a),
                 "iscrowd": int(int(i) in crowd)}
                for i, a in zip(present, counts) if i != 0 and int(i) not in unlisted]
    return {"file_name": f"{name}.png", "segments_info": segments}


def write_case(root: Path, images: list[tuple], categories: list[dict] = CATEGORIES) -> dict:
    """images: (gt_ids, gt_cats, crowd, pred_ids, pred_cats) per image. Returns the four paths."""
    gt = {"images": [], "annotations": [], "categories": categories}
    pred = {"annotations": []}
    for image_id, (gt_ids, gt_cats, crowd, pred_ids, pred_cats) in enumerate(images, start=1):
        name = f"{image_id:012d}"
        gt["images"].append({"id": image_id, "file_name": name + ".jpg", "height": gt_ids.shape[0],
                             "width": gt_ids.shape[1]})
        gt_ann = write_image(root / "gt", name, gt_ids, gt_cats, crowd)
        gt["annotations"].append({"image_id": image_id, **gt_ann})
        pred_ann = write_image(root / "pred", name, pred_ids, pred_cats)
        pred["annotations"].append({"image_id": image_id, **pred_ann})
    (root / "gt.json").write_text(json.dumps(gt))
    (root / "pred.json").write_text(json.dumps(pred))
    return {"gt_json": root / "gt.json", "gt_dir": root / "gt", "pred_json": root / "pred.json",
            "pred_dir": root / "pred"}


def random_image(rng: np.random.Generator, height: int = 40, width: int = 56, kind: str = "mixed") -> tuple:
    """A ground truth of painted rectangles (things, stuff, crowd, VOID) and a perturbed prediction."""
    cats = {"mixed": [1, 3, 5, 7, 9, 11], "things": [1, 3, 5], "stuff": [7, 9, 11]}[kind]
    rects = []
    for _ in range(int(rng.integers(3, 12))):
        y0, x0 = int(rng.integers(0, height - 4)), int(rng.integers(0, width - 4))
        h, w = int(rng.integers(3, height // 2)), int(rng.integers(3, width // 2))
        rects.append([y0, x0, y0 + h, x0 + w, int(rng.choice(cats))])
    gt_ids, gt_cats, crowd = _paint(rng, height, width, rects, void=int(rng.integers(0, 3)))
    for seg, cat in gt_cats.items():
        if cat in THINGS and rng.random() < 0.15:
            crowd.add(seg)
    pred_rects = []
    for y0, x0, y1, x1, cat in rects:
        if rng.random() < 0.1:
            continue  # missed: a false negative
        jitter = rng.integers(-3, 4, 4)
        if rng.random() < 0.1:
            cat = int(rng.choice([1, 3, 5, 7, 9, 11, 13]))  # wrong class, 13 absent from the GT
        pred_rects.append([y0 + jitter[0], x0 + jitter[1], y1 + jitter[2], x1 + jitter[3], cat])
    for _ in range(int(rng.integers(0, 3))):  # hallucinated segments
        y0, x0 = int(rng.integers(0, height - 4)), int(rng.integers(0, width - 4))
        pred_rects.append([y0, x0, y0 + 6, x0 + 6, int(rng.choice([1, 7, 13]))])
    pred_ids, pred_cats, _ = _paint(rng, height, width, pred_rects, void=int(rng.integers(0, 2)))
    return gt_ids, gt_cats, crowd, pred_ids, pred_cats


def _paint(rng, height, width, rects, void) -> tuple[np.ndarray, dict, set]:
    ids = np.zeros((height, width), np.int64)
    seg_ids = rng.choice(np.arange(1, 256**3), size=len(rects) + 1, replace=False)
    categories = {}
    for (y0, x0, y1, x1, cat), seg in zip(rects, seg_ids):
        ids[max(y0, 0):max(y1, 0), max(x0, 0):max(x1, 0)] = seg
        categories[int(seg)] = cat
    for _ in range(void):  # VOID patches
        y0, x0 = int(rng.integers(0, height - 4)), int(rng.integers(0, width - 4))
        ids[y0:y0 + int(rng.integers(2, 10)), x0:x0 + int(rng.integers(2, 10))] = 0
    # stuff of one category in several rectangles is still several segments here: fine for PQ
    return ids, categories, set()


# ----------------------------------------------------------------------------- reference


def reference(paths: dict) -> dict:
    """panopticapi's pq_compute (its own worker processes) in segtrain's shape; 0.0 of absent classes
    becomes NaN (segtrain's convention), everything else as is."""
    with contextlib.redirect_stdout(io.StringIO()):
        results = pq_evaluation.pq_compute(str(paths["gt_json"]), str(paths["pred_json"]),
                                           str(paths["gt_dir"]), str(paths["pred_dir"]))
    categories = json.loads(Path(paths["gt_json"]).read_text())["categories"]
    out = {}
    for suffix, key in (("", "All"), ("_th", "Things"), ("_st", "Stuff")):
        for name in ("PQ", "SQ", "RQ"):
            out[name + suffix] = 100 * results[key][name.lower()]
    return out, results, categories


def assert_matches_reference(paths: dict) -> dict:
    expected, results, categories = reference(paths)
    got = score_panoptic(**paths)["panoptic"]
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-6), key
    # A class with no TP/FP/FN is NaN here and 0.0 in pq_compute; every other value is equal.
    tallies = _tallies(paths)
    for cat in categories:
        ours = got["per_class"][cat["name"]]
        theirs = results["per_class"][cat["id"]]
        for name in ("PQ", "SQ", "RQ"):
            if cat["id"] in tallies:
                assert ours[name] == pytest.approx(100 * theirs[name.lower()], abs=1e-6), (cat, name)
            else:
                assert math.isnan(ours[name]) and theirs[name.lower()] == 0.0, (cat, name)
    return got


def _tallies(paths: dict) -> set[int]:
    """Categories pq_compute averages over (tp + fp + fn > 0), from its own single-core counter."""
    gt, pred = (json.loads(Path(paths[k]).read_text()) for k in ("gt_json", "pred_json"))
    by_image = {a["image_id"]: a for a in pred["annotations"]}
    pairs = [(a, by_image[a["image_id"]]) for a in gt["annotations"]]
    with contextlib.redirect_stdout(io.StringIO()):
        stat = pq_evaluation.pq_compute_single_core(0, pairs, str(paths["gt_dir"]), str(paths["pred_dir"]),
                                                    {c["id"]: c for c in gt["categories"]})
    return {c for c, s in stat.pq_per_cat.items() if s.tp + s.fp + s.fn > 0}


# ----------------------------------------------------------------------------- equality


@pytest.mark.parametrize("seed", range(6))
def test_random_cases_equal_pq_compute(tmp_path, seed):
    rng = np.random.default_rng(seed)
    images = [random_image(rng, kind=kind) for kind in ("mixed", "things", "stuff", "mixed", "mixed")]
    got = assert_matches_reference(write_case(tmp_path, images))
    assert 0 < got["PQ"] < 100  # perturbed predictions: neither perfect nor empty


def _blank(value: int = 0, shape=(20, 20)) -> np.ndarray:
    return np.full(shape, value, np.int64)


def test_iou_exactly_one_half_is_not_a_match_and_just_above_is(tmp_path):
    gt = _blank()
    gt[:10, :10] = 11  # 100 pixels, thing 1
    gt[10:, :] = 22    # stuff 7
    half = _blank()
    half[:10, :5] = 33  # intersection 50, union 100: IoU 0.5 exactly, not a match
    half[10:, :] = 44
    above = half.copy()
    above[0, 5] = 33    # 51 / 100
    paths = write_case(tmp_path, [(gt, {11: 1, 22: 7}, set(), half, {33: 1, 44: 7}),
                                  (gt, {11: 1, 22: 7}, set(), above, {33: 1, 44: 7})])
    got = assert_matches_reference(paths)
    # thing 1: one TP (IoU 0.51) of 2 GT and 2 predictions -> RQ 50, SQ 51
    assert got["per_class"]["cat1"]["RQ"] == pytest.approx(50)
    assert got["per_class"]["cat1"]["SQ"] == pytest.approx(51)


def test_void_is_left_out_of_the_union(tmp_path):
    gt = _blank()
    gt[:10, :10] = 11
    gt[:10, 10:] = 0   # VOID right of the thing
    gt[10:] = 22
    pred = _blank()
    pred[:10, 4:] = 33  # 60 on the thing, 100 on VOID: IoU 60 / 100 with VOID dropped
    pred[10:] = 44
    got = assert_matches_reference(write_case(tmp_path, [(gt, {11: 1, 22: 7}, set(), pred, {33: 1, 44: 7})]))
    assert got["per_class"]["cat1"]["SQ"] == pytest.approx(60)


def test_crowd_of_the_same_category_absorbs_a_prediction_and_other_category_does_not(tmp_path):
    gt = _blank()
    gt[:10] = 11   # crowd of thing 1
    gt[10:] = 22   # stuff 7
    pred = _blank()
    pred[:10, :8] = 33    # on the crowd, category 1: ignored
    pred[:10, 8:] = 34    # on the crowd, category 3: a false positive
    pred[10:] = 44
    got = assert_matches_reference(write_case(tmp_path, [(gt, {11: 1, 22: 7}, {11}, pred,
                                                          {33: 1, 34: 3, 44: 7})]))
    assert math.isnan(got["per_class"]["cat1"]["PQ"]) and got["per_class"]["cat3"]["PQ"] == 0


def test_mostly_void_prediction_is_not_a_false_positive(tmp_path):
    gt = _blank()
    gt[:, 10:] = 22
    gt[15:, 15:] = 55    # a thing of category 3, predicted exactly
    pred = gt.copy()
    pred[:, :11] = 33    # 200 of its 220 pixels are VOID: ignored
    got = assert_matches_reference(write_case(tmp_path, [(gt, {22: 7, 55: 3}, set(), pred,
                                                          {33: 1, 22: 7, 55: 3})]))
    assert math.isnan(got["per_class"]["cat1"]["PQ"])


def test_images_without_predicted_segments_and_stuff_or_things_only(tmp_path):
    rng = np.random.default_rng(7)
    things = random_image(rng, kind="things")
    stuff = random_image(rng, kind="stuff")
    empty = (things[0], things[1], things[2], _blank(shape=things[0].shape), {})
    assert_matches_reference(write_case(tmp_path, [things, stuff, empty]))


def test_last_crowd_segment_of_a_category_is_the_crowd_region(tmp_path):
    # pq_compute keeps one crowd segment per category (the last listed): mirrored.
    gt = _blank()
    gt[:10, :10] = 11
    gt[:10, 10:] = 12
    gt[10:] = 22
    pred = _blank()
    pred[:10, :10] = 33  # on the first crowd segment only: a false positive, as in pq_compute
    pred[10:] = 44
    got = assert_matches_reference(write_case(tmp_path, [(gt, {11: 1, 12: 1, 22: 7}, {11, 12}, pred,
                                                          {33: 1, 44: 7})]))
    assert got["per_class"]["cat1"]["PQ"] == 0


def test_ground_truth_area_is_the_json_area_not_the_pixel_count(tmp_path):
    gt = _blank()
    gt[:10, :10] = 11  # 100 pixels, listed with area 150: IoU 100 / 150 as pq_compute computes it
    gt[10:] = 22
    paths = write_case(tmp_path, [(gt, {11: 1, 22: 7}, set(), gt.copy(), {11: 1, 22: 7})])
    data = json.loads(paths["gt_json"].read_text())
    data["annotations"][0]["segments_info"][0]["area"] = 150
    paths["gt_json"].write_text(json.dumps(data))
    got = assert_matches_reference(paths)
    assert got["per_class"]["cat1"]["SQ"] == pytest.approx(100 * 100 / 150)


def test_gt_png_id_missing_from_its_json_is_neither_segment_nor_void(tmp_path):
    gt = _blank()
    gt[:10] = 11
    gt[10:] = 99  # in the PNG, not in the JSON
    pred = _blank()
    pred[:] = 44
    paths = write_case(tmp_path, [(gt, {11: 7, 99: 9}, set(), pred, {44: 7})])
    data = json.loads(paths["gt_json"].read_text())
    segments = data["annotations"][0]["segments_info"]
    data["annotations"][0]["segments_info"] = segments = [s for s in segments if s["id"] != 99]
    segments.append({"id": 5, "category_id": 1, "area": 30, "iscrowd": 0})
    paths["gt_json"].write_text(json.dumps(data))  # and id 5 listed but absent: a false negative
    assert_matches_reference(paths)


def test_stuff_only_categories_give_nan_things_where_pq_compute_divides_by_zero(tmp_path):
    gt = _blank()
    gt[:] = 22
    categories = [{"id": 7, "name": "cat7", "isthing": 0}]
    paths = write_case(tmp_path, [(gt, {22: 7}, set(), gt, {22: 7})], categories)
    with pytest.raises(ZeroDivisionError), contextlib.redirect_stdout(io.StringIO()):
        pq_evaluation.pq_compute(*(str(paths[k]) for k in ("gt_json", "pred_json", "gt_dir", "pred_dir")))
    got = score_panoptic(**paths)["panoptic"]
    assert got["PQ"] == 100 and got["PQ_st"] == 100 and math.isnan(got["PQ_th"])


@pytest.mark.skipif(not SAMPLE.is_dir(), reason=f"COCO panoptic sample not found at {SAMPLE}")
def test_coco_sample_against_itself_is_pq_100():
    paths = {"gt_json": SAMPLE / "panoptic_examples.json", "gt_dir": SAMPLE / "panoptic_examples",
             "pred_json": SAMPLE / "panoptic_examples.json", "pred_dir": SAMPLE / "panoptic_examples"}
    got = assert_matches_reference(paths)
    assert got["PQ"] == got["SQ"] == got["RQ"] == got["PQ_th"] == got["PQ_st"] == 100
    present = [v for v in got["per_class"].values() if not math.isnan(v["PQ"])]
    annotated = json.loads(paths["gt_json"].read_text())["annotations"]
    assert len(present) == len({s["category_id"] for a in annotated for s in a["segments_info"]}) == 8
    assert all(v["PQ"] == 100 for v in present)


# ----------------------------------------------------------------------------- errors


def _simple_case(tmp_path: Path) -> dict:
    gt = _blank()
    gt[:10] = 11
    gt[10:] = 22
    return write_case(tmp_path, [(gt, {11: 1, 22: 7}, set(), gt.copy(), {11: 1, 22: 7})])


def _edit_prediction(paths: dict, edit) -> None:
    data = json.loads(paths["pred_json"].read_text())
    edit(data["annotations"][0]["segments_info"], data)
    paths["pred_json"].write_text(json.dumps(data))


def test_error_png_id_missing_from_the_json_names_image_and_segment(tmp_path):
    paths = _simple_case(tmp_path)
    _edit_prediction(paths, lambda segments, _: segments.pop(0))
    with pytest.raises(ValueError, match=r"image 1 \(000000000001.png\): segment id 11 is in the prediction "
                                         r"PNG but not in its JSON"):
        score_panoptic(**paths)


def test_error_json_id_missing_from_the_png_names_image_and_segment(tmp_path):
    paths = _simple_case(tmp_path)
    _edit_prediction(paths, lambda segments, _: segments.append({"id": 77, "category_id": 3}))
    with pytest.raises(ValueError, match=r"image 1 .*segment id 77 is in the prediction JSON but not in its "
                                         r"PNG"):
        score_panoptic(**paths)


def test_error_unknown_category_names_image_segment_and_category(tmp_path):
    paths = _simple_case(tmp_path)
    _edit_prediction(paths, lambda segments, _: segments[1].update(category_id=4))
    with pytest.raises(ValueError, match=r"image 1 .*segment id 22 has unknown category_id 4"):
        score_panoptic(**paths)


def test_error_segment_listed_twice(tmp_path):
    paths = _simple_case(tmp_path)
    _edit_prediction(paths, lambda segments, _: segments.append(dict(segments[0])))
    with pytest.raises(ValueError, match=r"image 1 .*segment id 11 is listed twice"):
        score_panoptic(**paths)


def test_error_missing_png_names_image_and_path(tmp_path):
    paths = _simple_case(tmp_path)
    (paths["pred_dir"] / "000000000001.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"image 1 .*prediction PNG not found: .*000000000001.png"):
        score_panoptic(**paths)


def test_error_image_without_prediction(tmp_path):
    paths = _simple_case(tmp_path)
    # Neither the id nor the file stem names the image (a stem alone would: see test_predict_score).
    _edit_prediction(paths, lambda _, data: data["annotations"][0].update(image_id=5, file_name="x.png"))
    with pytest.raises(ValueError, match="no prediction for the image with id 1"):
        score_panoptic(**paths)


def test_error_prediction_of_another_size(tmp_path):
    paths = _simple_case(tmp_path)
    small = np.asarray(Image.open(paths["pred_dir"] / "000000000001.png"))[:15]
    Image.fromarray(small).save(paths["pred_dir"] / "000000000001.png")
    with pytest.raises(ValueError, match=r"image 1 .*prediction is \(15, 20\) but the ground truth is "
                                         r"\(20, 20\)"):
        score_panoptic(**paths)


# ----------------------------------------------------------------------------- evaluator and CLI


def _meta() -> DatasetMeta:
    ids = [c["id"] for c in CATEGORIES]
    return DatasetMeta([c["name"] for c in CATEGORIES], default_palette(len(ids)),
                       thing_ids=[k for k, c in enumerate(ids) if c in THINGS],
                       stuff_ids=[k for k, c in enumerate(ids) if c in STUFF], category_ids=ids)


def _as_sample(image_id: int, image: tuple, meta: DatasetMeta, file_name: bool) -> tuple[dict, dict]:
    torch = pytest.importorskip("torch")
    gt_ids, gt_cats, crowd, pred_ids, pred_cats = image
    gt_present = [int(i) for i in np.unique(gt_ids) if i]
    pred_present = [int(i) for i in np.unique(pred_ids) if i]
    target = {"image_id": image_id, "panoptic": torch.from_numpy(gt_ids), "segments": {
        "ids": torch.tensor(gt_present),
        "classes": torch.tensor([meta.contiguous_id(gt_cats[i]) for i in gt_present]),
        "iscrowd": torch.tensor([int(i in crowd) for i in gt_present])}}
    if file_name:
        target["file_name"] = f"{image_id:012d}.jpg"
    prediction = {"panoptic": torch.from_numpy(pred_ids).int(), "segments": [
        {"id": i, "category_id": meta.contiguous_id(pred_cats[i]), "isthing": False, "score": 1.0}
        for i in pred_present]}
    return target, prediction


def _assert_same_metrics(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a["per_class"].keys() == b["per_class"].keys()
    flat = [(a[k], b[k]) for k in a if k != "per_class"]
    flat += [(a["per_class"][n][k], b["per_class"][n][k]) for n in a["per_class"] for k in ("PQ", "SQ", "RQ")]
    for x, y in flat:
        assert (math.isnan(x) and math.isnan(y)) or x == pytest.approx(y, abs=1e-9)


def test_evaluator_on_tensors_equals_score_panoptic_on_files_and_writes_coco_panoptic(tmp_path):
    rng = np.random.default_rng(3)
    images = [random_image(rng, kind=kind) for kind in ("mixed", "things", "stuff", "mixed")]
    paths = write_case(tmp_path / "files", images)
    meta = _meta()
    evaluator = PanopticEvaluator(meta, output_dir=tmp_path / "out")
    samples = [_as_sample(i, image, meta, file_name=i % 2 == 0) for i, image in enumerate(images, start=1)]
    for start in (0, 2):  # two batches
        batch = samples[start:start + 2]
        evaluator.process([t for t, _ in batch], [p for _, p in batch])
    got = evaluator.compute()["panoptic"]
    expected = score_panoptic(**paths)["panoptic"]
    _assert_same_metrics(got, expected)
    assert 0 < got["PQ"] < 100
    written = {**paths, "pred_json": tmp_path / "out" / "panoptic_predictions.json",
               "pred_dir": tmp_path / "out" / "panoptic_predictions"}
    assert sorted(p.name for p in written["pred_dir"].iterdir()) == [f"{i:012d}.png" for i in range(1, 5)]
    _assert_same_metrics(assert_matches_reference(written), expected)
    evaluator.reset()
    evaluator.process([samples[0][0]], [samples[0][1]])
    assert evaluator.compute()["panoptic"]["PQ"] != got["PQ"]  # reset forgot the other images


def test_evaluator_rejects_a_class_that_is_not_a_panoptic_category(tmp_path):
    meta = DatasetMeta(["background", "thing", "stuff"], default_palette(3), thing_ids=[1], stuff_ids=[2])
    image = (_blank(11), {11: 1}, set(), _blank(12), {12: 0})
    target, prediction = _as_sample(4, image, meta, file_name=False)
    with pytest.raises(ValueError, match=r"image 4: segment class 0 is not a panoptic category"):
        PanopticEvaluator(meta).process([target], [prediction])


def test_score_cli_writes_pq_and_prints_the_table(tmp_path):
    rng = np.random.default_rng(11)
    paths = write_case(tmp_path, [random_image(rng) for _ in range(3)])
    out = tmp_path / "m.json"
    result = run_cli("score", "task=panoptic", f"gt={paths['gt_json']}", f"gt_dir={paths['gt_dir']}",
                     f"pred={paths['pred_json']}", f"pred_dir={paths['pred_dir']}", f"output={out}",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    written = json.loads(out.read_text())["panoptic"]
    expected = score_panoptic(**paths)["panoptic"]
    assert written["PQ"] == pytest.approx(expected["PQ"], abs=1e-9)
    for name, values in written["per_class"].items():
        assert (values["PQ"] is None) == math.isnan(expected["per_class"][name]["PQ"]), name
    assert "Things" in result.stdout and "cat1" in result.stdout and "cat15" not in result.stdout


def test_score_cli_error_names_image_and_segment(tmp_path):
    paths = _simple_case(tmp_path)
    _edit_prediction(paths, lambda segments, _: segments.pop(0))
    result = run_cli("score", "task=panoptic", f"gt={paths['gt_json']}", f"gt_dir={paths['gt_dir']}",
                     f"pred={paths['pred_json']}", f"pred_dir={paths['pred_dir']}", cwd=tmp_path)
    assert result.returncode == 1 and "segment id 11 is in the prediction PNG" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_score_panoptic_never_imports_torch(tmp_path):
    paths = _simple_case(tmp_path)
    assert not score_loads_torch(["task=panoptic", f"gt={paths['gt_json']}", f"gt_dir={paths['gt_dir']}",
                                  f"pred={paths['pred_json']}", f"pred_dir={paths['pred_dir']}",
                                  f"output={tmp_path / 'm.json'}", f"hydra.run.dir={tmp_path / 'run'}"],
                                 cwd=tmp_path)
    assert (tmp_path / "m.json").exists()


def without_libpng(monkeypatch) -> None:
    from segtrain.utils import png

    monkeypatch.setattr(png, "_libpng", lambda: None)


@pytest.mark.parametrize("decoder", ["libpng", "PIL"])
@pytest.mark.parametrize("mode", ["RGB", "RGBA"])
def test_both_decoders_give_the_ids_and_reject_non_rgb(tmp_path, monkeypatch, decoder, mode):
    if decoder == "PIL":
        without_libpng(monkeypatch)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 2**24, (37, 53), dtype=np.uint32)
    channels = [(ids >> shift) & 255 for shift in (0, 8, 16)]
    if mode == "RGBA":
        channels.append(rng.integers(0, 256, ids.shape, dtype=np.uint32))
    Image.fromarray(np.stack(channels, -1).astype(np.uint8), mode).save(tmp_path / "ids.png")
    Image.fromarray((ids & 255).astype(np.uint8), "L").save(tmp_path / "gray.png")
    np.testing.assert_array_equal(read_panoptic_png(tmp_path / "ids.png"), ids)
    with pytest.raises(ValueError, match="gray.png.*expected RGB-encoded ids"):
        read_panoptic_png(tmp_path / "gray.png")


def test_png_with_gamma_reads_the_stored_ids_as_pq_compute(tmp_path):
    """libpng would colour-correct a gAMA file; such files go to PIL, which reads what is stored."""
    ids = np.random.default_rng(3).integers(0, 2**24, (9, 11), dtype=np.uint32)
    info = PngImagePlugin.PngInfo()
    info.add(b"gAMA", (100000).to_bytes(4, "big"))
    Image.fromarray(id_to_rgb(ids.astype(np.int64)), "RGB").save(tmp_path / "gamma.png", pnginfo=info)
    np.testing.assert_array_equal(read_panoptic_png(tmp_path / "gamma.png"), ids)


def test_corrupt_png_error_names_the_file(tmp_path):
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "ok.png")
    data = bytearray((tmp_path / "ok.png").read_bytes())
    cut = data.index(b"IDAT") + 8
    (tmp_path / "bad.png").write_bytes(bytes(data[:cut]) + bytes(10))
    with pytest.raises(ValueError, match=r"bad\.png could not be decoded: libpng"):
        read_panoptic_png(tmp_path / "bad.png")


@pytest.mark.parametrize("decoder", ["libpng", "PIL"])
def test_ids_of_any_shape_fill_a_reused_buffer_exactly(tmp_path, monkeypatch, decoder):
    """The strided uint32 view must neither read past the last pixel nor mix pixels."""
    if decoder == "PIL":
        without_libpng(monkeypatch)
    rng = np.random.default_rng(1)
    buffer = None
    for shape in [(1, 1), (1, 7), (5, 1), (2, 3), (31, 17), (2, 3)]:
        for mode in ("RGB", "RGBA"):
            ids = rng.integers(0, 2**24, shape, dtype=np.uint32)
            ids.flat[-1] = 2**24 - 1  # the last pixel, read on its own
            channels = [(ids >> shift) & 255 for shift in (0, 8, 16)] + [ids * 0 + 7] * (mode == "RGBA")
            Image.fromarray(np.stack(channels, -1).astype(np.uint8), mode).save(tmp_path / "ids.png")
            got = read_panoptic_png(tmp_path / "ids.png", out=buffer)
            np.testing.assert_array_equal(got, ids)
            assert got.dtype == np.int64
            if buffer is not None and buffer.shape == shape:
                assert got is buffer
            buffer = got


def test_metrics_are_plain_floats_as_checkpoints_need():
    from segtrain.metrics.panoptic import Categories, pq_from_stats

    categories = Categories([1, 2], ["thing", "stuff"], [True, False])
    stats = np.array([[2, 1, 0], [1, 0, 0], [0, 1, 0], [1.5, 0.7, 0]], dtype=np.float64)
    panoptic = pq_from_stats(stats, categories)["panoptic"]
    values = [v for k, v in panoptic.items() if k != "per_class"]
    values += [v for per in panoptic["per_class"].values() for v in per.values()]
    assert values and all(type(v) is float for v in values)  # numpy scalars fail torch.load(weights_only)
    assert panoptic["PQ_th"] == pytest.approx(100 * 1.5 / (2 + 0.5))
