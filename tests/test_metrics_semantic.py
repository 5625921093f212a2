"""SemanticEvaluator: hand-computed metrics, validation, NumPy agreement, DDP sum, PNG folders."""

from __future__ import annotations

import json
import math
import os
import warnings

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from segtrain.metrics import semantic as semantic_module
from segtrain.metrics.semantic import (
    SemanticEvaluator,
    compute_confusion_matrix,
    score_semantic_dirs,
    summarize_confusion_matrix,
)


@pytest.fixture(params=["numpy", "torch"])
def counter(request, monkeypatch):
    """Run a test through the CPU (NumPy) counting path and through the torch one used on GPUs."""
    if request.param == "torch":
        monkeypatch.setattr(semantic_module, "_count_cpu", semantic_module._count_device)
    return request.param


def semantic(evaluator: SemanticEvaluator) -> dict:
    return evaluator.compute()["semantic"]


def numpy_confusion(pred: np.ndarray, gt: np.ndarray, c: int, ignore: int) -> np.ndarray:
    valid = gt != ignore
    return np.bincount(c * gt[valid] + pred[valid], minlength=c * c).reshape(c, c)


# ---------------------------------------------------------------------------- hand-computed cases
def test_three_class_metrics_match_hand_computation_with_an_ignored_pixel(counter):
    gt = torch.tensor([[0, 0, 1], [1, 2, 255]])
    pred = torch.tensor([[0, 1, 1], [1, 2, 0]])
    evaluator = SemanticEvaluator(3, class_names=["road", "car", "sky"])
    evaluator.update(pred, gt)
    # 5 valid pixels: road 1/2 right (1 car FP), car 2/2, sky 1/1; the ignored one counts nowhere
    assert evaluator.confusion_matrix.tolist() == [[1, 1, 0], [0, 2, 0], [0, 0, 1]]
    m = semantic(evaluator)
    iou = {"road": 1 / 2, "car": 2 / 3, "sky": 1.0}
    acc = {"road": 1 / 2, "car": 1.0, "sky": 1.0}
    for name in iou:
        assert m["per_class"][name]["IoU"] == pytest.approx(100 * iou[name])
        assert m["per_class"][name]["Acc"] == pytest.approx(100 * acc[name])
    assert m["mIoU"] == pytest.approx(100 * (1 / 2 + 2 / 3 + 1) / 3)
    assert m["aAcc"] == pytest.approx(100 * 4 / 5)
    assert m["mAcc"] == pytest.approx(100 * (1 / 2 + 1 + 1) / 3)
    assert m["fwIoU"] == pytest.approx(100 * (2 / 5 * 1 / 2 + 2 / 5 * 2 / 3 + 1 / 5 * 1))
    assert all(isinstance(m[k], float) for k in ("mIoU", "aAcc", "mAcc", "fwIoU"))


def test_class_absent_everywhere_is_nan_and_predicted_only_class_has_iou_zero():
    gt = torch.tensor([0, 0, 1, 1])
    pred = torch.tensor([0, 2, 1, 1])
    evaluator = SemanticEvaluator(4)
    evaluator.update(pred, gt)
    m = semantic(evaluator)
    # class 2: predicted once, never in GT -> IoU 0 (counted), Acc NaN; class 3: nowhere -> NaN
    assert m["per_class"]["2"]["IoU"] == 0.0 and math.isnan(m["per_class"]["2"]["Acc"])
    assert math.isnan(m["per_class"]["3"]["IoU"]) and math.isnan(m["per_class"]["3"]["Acc"])
    assert m["mIoU"] == pytest.approx(100 * (1 / 2 + 1 + 0) / 3)
    assert m["mAcc"] == pytest.approx(100 * (1 / 2 + 1) / 2)
    assert m["aAcc"] == pytest.approx(75.0)
    assert m["fwIoU"] == pytest.approx(100 * (1 / 2 * 1 / 2 + 1 / 2 * 1))


def test_predictions_on_ignored_pixels_change_nothing(counter):
    gt = torch.tensor([[0, 255], [1, 255]])
    a, b = SemanticEvaluator(2), SemanticEvaluator(2)
    a.update(torch.tensor([[0, 0], [1, 0]]), gt)
    b.update(torch.tensor([[0, 1], [1, 1]]), gt)
    assert a.confusion_matrix.tolist() == b.confusion_matrix.tolist() == [[1, 0], [0, 1]]


def test_no_valid_pixel_gives_nan_everywhere():
    evaluator = SemanticEvaluator(2)
    evaluator.update(torch.zeros(2, 2, dtype=torch.long), torch.full((2, 2), 255))
    m = semantic(evaluator)
    assert all(math.isnan(m[k]) for k in ("mIoU", "aAcc", "mAcc", "fwIoU"))


# ---------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("bad", [3, 100, 254, 256, 1000, -1])
def test_target_value_outside_classes_and_not_ignore_is_an_error_naming_it(bad, counter):
    gt = torch.tensor([[0, 1], [2, bad]])
    with pytest.raises(ValueError, match=rf"\[{bad}\].*outside \[0, 3\).*ignore_index=255"):
        compute_confusion_matrix(torch.zeros(2, 2, dtype=torch.long), gt, 3)


@pytest.mark.parametrize("bad", [3, 255, -2])
def test_prediction_outside_classes_is_an_error_naming_it(bad, counter):
    pred = torch.tensor([0, 1, bad])
    with pytest.raises(ValueError, match=rf"predicted class ids \[{bad}\] are outside \[0, 3\)"):
        compute_confusion_matrix(pred, torch.tensor([0, 1, 2]), 3)


def test_shape_and_dtype_mismatches_are_errors():
    with pytest.raises(ValueError, match=r"\(2, 3\) differs from target shape \(3, 2\)"):
        compute_confusion_matrix(torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, 2), 2)
    with pytest.raises(TypeError, match="torch.float32; expected integer"):
        compute_confusion_matrix(torch.zeros(4), torch.zeros(4, dtype=torch.long), 2)


def test_class_names_must_match_num_classes_and_be_unique():
    with pytest.raises(ValueError, match="2 class names given for num_classes=3"):
        SemanticEvaluator(3, class_names=["a", "b"])
    with pytest.raises(ValueError, match=r"repeated: \['a'\]"):
        SemanticEvaluator(3, class_names=["a", "b", "a"])


@pytest.mark.parametrize("ignore", [-1, 0, 2, 255, 1000, 65535])
def test_any_ignore_index_matches_numpy_and_rejects_other_values(ignore, counter):
    g = torch.Generator().manual_seed(ignore % 97)
    c = 5
    gt = torch.randint(0, c, (3, 17, 13), generator=g)
    gt[torch.rand(gt.shape, generator=g) < 0.2] = ignore
    pred = torch.randint(0, c, gt.shape, generator=g)
    shifted = np.where(gt.numpy() == ignore, -1, gt.numpy())  # numpy bincount needs >= 0
    expected = numpy_confusion(pred.numpy(), shifted, c, -1)
    assert compute_confusion_matrix(pred, gt, c, ignore).numpy().tolist() == expected.tolist()
    stray = c if ignore != c else c + 1  # just past the classes, e.g. ignore remapped to row C
    gt.view(-1)[0] = stray
    with pytest.raises(ValueError, match=rf"\[{stray}\]"):
        compute_confusion_matrix(pred, gt, c, ignore)


# --------------------------------------------------------------------------- reference agreement
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int32, torch.int64])
def test_confusion_matches_numpy_reference_on_random_maps(dtype, counter):
    g = torch.Generator().manual_seed(0)
    c = 19
    gt = torch.randint(0, c, (4, 33, 47), generator=g)
    gt[torch.rand(gt.shape, generator=g) < 0.1] = 255
    pred = torch.randint(0, c, gt.shape, generator=g)
    expected = numpy_confusion(pred.numpy().ravel(), gt.numpy().ravel(), c, 255)
    got = compute_confusion_matrix(pred.to(dtype), gt.to(dtype), c)
    assert got.dtype == torch.int64 and got.tolist() == expected.tolist()
    evaluator = SemanticEvaluator(c)
    evaluator.update(pred, gt)
    tp = np.diag(expected)
    iou = tp / (expected.sum(0) + expected.sum(1) - tp)
    np.testing.assert_allclose(semantic(evaluator)["mIoU"], 100 * iou.mean(), rtol=1e-12)


def test_batch_and_one_by_one_accumulation_agree_and_reset_clears():
    g = torch.Generator().manual_seed(1)
    gt = torch.randint(0, 4, (5, 8, 9), generator=g)
    gt[:, 0] = 255
    pred = torch.randint(0, 4, gt.shape, generator=g)
    whole, single = SemanticEvaluator(4), SemanticEvaluator(4)
    whole.update(pred, gt)
    per_image = SemanticEvaluator(4)
    per_image.process([{"semantic": t} for t in gt], [{"sem_seg": p} for p in pred])
    # float class scores are read through their argmax
    scores = torch.nn.functional.one_hot(pred, 4).permute(0, 3, 1, 2).float()
    per_image.process([{"semantic": t} for t in gt], [{"sem_seg": p} for p in scores])
    assert torch.equal(per_image.confusion_matrix, 2 * whole.confusion_matrix)
    for i in range(5):
        single.update(pred[i], gt[i])
    assert torch.equal(whole.confusion_matrix, single.confusion_matrix)
    assert whole.compute() == single.compute()
    assert int(whole.confusion_matrix.sum()) == 5 * 7 * 9
    whole.reset()
    assert int(whole.confusion_matrix.sum()) == 0
    whole.update(pred[0], gt[0])
    assert torch.equal(whole.confusion_matrix, compute_confusion_matrix(pred[0], gt[0], 4))


def test_compute_leaves_the_accumulated_state_unchanged():
    evaluator = SemanticEvaluator(2)
    evaluator.update(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0]))
    first = evaluator.compute()
    assert evaluator.compute() == first
    assert evaluator.confusion_matrix.tolist() == [[1, 1], [0, 1]]


# ------------------------------------------------------------------------------- distributed sum
def _ddp_worker(rank: int, world: int, tmp: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=rank, world_size=world)
    try:
        evaluator = SemanticEvaluator(3)
        if rank == 0:
            evaluator.update(torch.tensor([0, 1, 2]), torch.tensor([0, 1, 1]))
        else:  # rank 1 sees a different sample
            evaluator.update(torch.tensor([2, 2]), torch.tensor([2, 255]))
        result = [evaluator.compute(), evaluator.confusion_matrix.tolist()]
        with open(f"{tmp}/rank{rank}.json", "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


def test_compute_sums_confusion_matrices_across_ranks(tmp_path):
    mp.spawn(_ddp_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    (metrics0, local0), (metrics1, local1) = (
        json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)
    )
    assert local0 == [[1, 0, 0], [0, 1, 1], [0, 0, 0]] and local1 == [[0, 0, 0]] * 2 + [[0, 0, 1]]
    assert metrics0 == metrics1
    # summed matrix [[1,0,0],[0,1,1],[0,0,1]]: IoU 1, 1/2, 1/2
    assert metrics0["semantic"]["mIoU"] == pytest.approx(100 * 2 / 3)
    assert metrics0["semantic"]["aAcc"] == pytest.approx(75.0)


# ---------------------------------------------------------------------------- folders of PNGs
def write_png(path, array) -> None:
    Image.fromarray(np.asarray(array, dtype=np.uint8), mode="L").save(path)


@pytest.fixture
def label_dirs(tmp_path):
    rng = np.random.default_rng(0)
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    gt_dir.mkdir(), pred_dir.mkdir()
    pairs = {}
    for stem in ("a", "b", "c"):
        gt = rng.integers(0, 3, (6, 7))
        gt[0, :3] = 255
        pred = rng.integers(0, 3, (6, 7))
        write_png(gt_dir / f"{stem}.png", gt)
        write_png(pred_dir / f"{stem}.png", pred)
        pairs[stem] = (gt, pred)
    return gt_dir, pred_dir, pairs


def test_score_semantic_dirs_equals_the_in_memory_evaluation(label_dirs):
    gt_dir, pred_dir, pairs = label_dirs
    expected = sum(numpy_confusion(p.ravel(), g.ravel(), 3, 255) for g, p in pairs.values())
    reference = SemanticEvaluator(3, class_names=["x", "y", "z"])
    reference.confusion += torch.from_numpy(expected)
    for workers in (1, 3):
        got = score_semantic_dirs(gt_dir, pred_dir, 3, class_names=["x", "y", "z"],
                                  num_workers=workers)
        assert got == reference.compute()


def test_score_semantic_dirs_names_missing_predictions_and_both_dirs(label_dirs):
    gt_dir, pred_dir, _ = label_dirs
    (pred_dir / "b.png").unlink()
    (pred_dir / "c.png").unlink()
    with pytest.raises(FileNotFoundError, match="2 of 3") as info:
        score_semantic_dirs(gt_dir, pred_dir, 3)
    assert str(gt_dir) in str(info.value) and str(pred_dir) in str(info.value)
    assert "b, c" in str(info.value)


def test_score_semantic_dirs_rejects_a_prediction_of_another_size(label_dirs):
    gt_dir, pred_dir, _ = label_dirs
    write_png(pred_dir / "b.png", np.zeros((6, 8)))
    with pytest.raises(ValueError, match=r"b\.png is \(6, 8\).*is \(6, 7\)"):
        score_semantic_dirs(gt_dir, pred_dir, 3)


def test_score_semantic_dirs_names_the_file_with_a_bad_label(label_dirs):
    gt_dir, pred_dir, _ = label_dirs
    write_png(gt_dir / "c.png", np.full((6, 7), 7))
    with pytest.raises(ValueError, match=r"c\.png.*\[7\] are outside \[0, 3\)"):
        score_semantic_dirs(gt_dir, pred_dir, 3)


def test_score_semantic_dirs_ignores_extra_predictions_with_a_warning(label_dirs):
    gt_dir, pred_dir, _ = label_dirs
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        baseline = score_semantic_dirs(gt_dir, pred_dir, 3)
    assert not [w for w in caught if "no ground truth" in str(w.message)]
    write_png(pred_dir / "extra.png", np.zeros((2, 2)))
    with pytest.warns(UserWarning, match="1 predictions .* no ground truth .* extra"):
        assert score_semantic_dirs(gt_dir, pred_dir, 3) == baseline


def test_score_semantic_dirs_missing_or_empty_dirs_are_named(tmp_path, label_dirs):
    gt_dir, pred_dir, _ = label_dirs
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'nope'} does not exist"):
        score_semantic_dirs(tmp_path / "nope", pred_dir, 3)
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        score_semantic_dirs(gt_dir, pred_dir / "a.png", 3)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("")
    with pytest.raises(FileNotFoundError, match=f"{empty} holds no .png"):
        score_semantic_dirs(gt_dir, empty, 3)
    assert os.listdir(gt_dir)  # the fixture's files are untouched


# ------------------------------------------------------------- Dice / F-score and the saved matrix
def test_dice_fscore_precision_recall_follow_mmsegs_definitions_per_class():
    # rows = ground truth, cols = prediction; class 3 is predicted but never true, class 4 neither
    cm = torch.tensor([[50, 3, 2, 5, 0], [4, 30, 6, 0, 0], [0, 5, 20, 0, 0], [0, 0, 0, 0, 0],
                       [0, 0, 0, 0, 0]])
    m = summarize_confusion_matrix(cm, list("abcde"))
    for k, name in enumerate("abc"):
        tp, gt, pred = float(cm[k, k]), float(cm[k].sum()), float(cm[:, k].sum())
        p, r = tp / pred, tp / gt
        row = m["per_class"][name]
        assert row["Dice"] == pytest.approx(100 * 2 * tp / (gt + pred))
        assert row["Precision"] == pytest.approx(100 * p) and row["Recall"] == pytest.approx(100 * r)
        assert row["Fscore"] == pytest.approx(100 * 2 * p * r / (p + r))
    d = m["per_class"]["d"]  # predicted, never true: Dice 0, precision 0, recall and F NaN
    assert d["Dice"] == 0 and d["Precision"] == 0 and math.isnan(d["Recall"]) and math.isnan(d["Fscore"])
    assert all(math.isnan(v) for v in m["per_class"]["e"].values())
    assert m["mDice"] == pytest.approx(np.mean([m["per_class"][n]["Dice"] for n in "abcd"]))
    assert m["mFscore"] == pytest.approx(np.mean([m["per_class"][n]["Fscore"] for n in "abc"]))
    assert m["mRecall"] == m["mAcc"]


def test_fscore_precision_recall_equal_torchmetrics_on_random_maps():
    torchmetrics = pytest.importorskip("torchmetrics")  # the bench extra, which make test installs
    from torchmetrics.functional.classification import (
        multiclass_f1_score,
        multiclass_precision,
        multiclass_recall,
    )

    del torchmetrics
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 6, (4, 32, 40), generator=g)
    target[:, :3] = 255
    pred = torch.where(torch.rand(target.shape, generator=g) < 0.6, target.clamp(max=5),
                       torch.randint(0, 6, target.shape, generator=g))
    m = summarize_confusion_matrix(compute_confusion_matrix(pred, target, 6), list("abcdef"))
    kwargs = {"num_classes": 6, "average": None, "ignore_index": 255, "multidim_average": "global"}
    for key, fn in (("Fscore", multiclass_f1_score), ("Precision", multiclass_precision),
                    ("Recall", multiclass_recall)):
        expected = 100 * fn(pred, target, **kwargs)
        got = torch.tensor([m["per_class"][n][key] for n in "abcdef"], dtype=torch.float32)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)


def test_evaluator_saves_the_matrix_as_csv_and_heatmap_and_draws_it(tmp_path):
    import csv

    from segtrain.data.meta import DatasetMeta, default_palette
    from segtrain.metrics.build import build_evaluators

    meta = DatasetMeta(["road", "car", "sky"], default_palette(3))
    evaluators = build_evaluators(["semantic"], meta, output_dir=tmp_path)
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 1]])
    evaluators.process([{"semantic": target}], [{"sem_seg": pred}])
    assert evaluators.figures() == {}  # nothing computed yet
    evaluators.compute()
    rows = list(csv.reader((tmp_path / "confusion_matrix.csv").open()))
    assert rows[0] == ["ground truth \\ prediction", "road", "car", "sky"]
    assert rows[1:] == [["road", "1", "1", "0"], ["car", "0", "3", "0"], ["sky", "1", "0", "1"]]
    png = np.asarray(Image.open(tmp_path / "confusion_matrix.png"))
    figure = evaluators.figures()["confusion_matrix"]
    assert figure.dtype == torch.uint8 and tuple(figure.shape) == (3, *png.shape[:2])
    assert np.array_equal(figure.permute(1, 2, 0).numpy(), png)
    # car's row is all on the diagonal: its cell is viridis' top colour (yellow)
    from segtrain.metrics.confusion_plot import confusion_heatmap

    plain = confusion_heatmap(torch.tensor([[1, 1, 0], [0, 3, 0], [1, 0, 1]]), ["r", "c", "s"])
    yellow = torch.tensor([253, 231, 37], dtype=torch.uint8)
    assert plain.shape[0] == 3 and (plain.reshape(3, -1).t() == yellow).all(1).any()
