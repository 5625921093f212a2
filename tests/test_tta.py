"""Test-time augmentation (segtrain.inference.tta): options, the semantic average (whole and
sliding-window), Mask R-CNN / Mask Scoring R-CNN / Panoptic FPN box merging and mask averaging,
Mask2Former's query-wise average, the refusal of families without TTA, and `tta=` through the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import TINY, run_cli
from hydra.utils import instantiate
from test_predict_cli import _val_set
from torch import nn

from segtrain.builders import build_task
from segtrain.data.export.semantic import export_semantic
from segtrain.inference.tta import (
    TTAOptions,
    predict_semantic,
    semantic_probabilities,
    tta_options,
    with_tta,
)
from segtrain.inference.tta_mask2former import QueryAverage, predict_mask2former
from segtrain.inference.tta_rcnn import _merge, predict_rcnn
from segtrain.inference.tta_spatial_embeddings import averaged_maps, predict_spatial_embeddings
from segtrain.predictions import check_prediction
from segtrain.tasks.semantic import SemanticTask

SMALL_DETECTOR = ["model.min_size=64", "model.max_size=64", "model.rpn_pre_nms_top_n_test=50",
                  "model.rpn_post_nms_top_n_test=20", "model.box_score_thresh=0.0",
                  "model.box_detections_per_img=15"]
SMALL_MASK2FORMER = ["model.backbone=resnet18", "model.hidden_dim=32", "model.mask_dim=32",
                     "model.num_queries=8", "model.nheads=4", "model.dim_feedforward=64",
                     "model.dec_layers=2", "model.enc_layers=1", "model.enc_dim_feedforward=64"]
TWICE = TTAOptions(flip=False, scales=(1.0, 1.0))  # two identical passes: merging must undo them


# ------------------------------------------------------------------------------------ options
def test_presets_compose_into_options(compose_cfg):
    for name, expected in [("none", TTAOptions()), ("flip", TTAOptions(True, (1.0,))),
                           ("ms3_flip", TTAOptions(True, (0.75, 1.0, 1.25))),
                           ("ms_flip", TTAOptions(True, (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)))]:
        for command in ("eval", "predict"):
            cfg = compose_cfg(command, [f"tta={name}"])
            assert tta_options(cfg.tta) == expected, (command, name)
    cfg = compose_cfg("eval", ["tta=flip", "tta.scales=[0.5,1]"])
    assert tta_options(cfg.tta) == TTAOptions(True, (0.5, 1.0))
    assert tta_options(compose_cfg("eval").tta).enabled is False  # the default is off


@pytest.mark.parametrize("node, key", [
    ({"flip": True, "scale": [1.0]}, "tta.scale"),
    ({"flip": True, "scales": [0.0]}, "tta.scales"),
    ({"flip": False, "scales": [1.0, -0.5]}, "tta.scales"),
    ({"flip": False, "scales": []}, "tta.scales"),
    ({"flip": False, "scales": [1.0, 1.0]}, "tta.scales"),
    ({"flip": "yes", "scales": [1.0]}, "tta.flip"),
])
def test_bad_options_are_errors_naming_the_key(node, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        tta_options(node)


def test_no_tta_is_the_task_itself_so_predictions_are_unchanged():
    task = SemanticTask(3)
    assert with_tta(task, TTAOptions()) is task
    assert with_tta(task, TTAOptions(True)) is not task


def test_a_family_without_tta_is_refused():
    class OtherTask:  # e.g. a user's own task with no TTA support
        pass

    with pytest.raises(ValueError, match="tta=.*OtherTask.*tta=none"):
        with_tta(OtherTask(), TTAOptions(True))


# ----------------------------------------------------------------------------------- semantic
class ColumnModel(nn.Module):
    """Per-pixel logits that depend on the column: class 0 grows to the right, so the flipped pass
    disagrees with the plain one. Records its input sizes."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[tuple[int, int]] = []

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        self.sizes.append(tuple(x.shape[-2:]))
        ramp = torch.linspace(-2.0, 3.0, x.shape[-1]).expand(x.shape[0], 1, x.shape[-2], -1)
        return {"out": torch.cat([ramp + x[:, :1], -ramp, 0.1 * x[:, 1:2]], dim=1)}


def _semantic_batch(sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    samples = [(torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8),
                {"image_id": i, "orig_size": torch.tensor([h, w])}) for i, (h, w) in enumerate(sizes)]
    return SemanticTask(3).collate(samples)


def test_flip_of_a_flip_equivariant_model_equals_no_tta():
    task = SemanticTask(3)
    model = nn.Conv2d(3, 3, 1)  # per pixel: exactly flip-equivariant
    wrapped = lambda x: {"out": model(x)}  # noqa: E731
    batch = _semantic_batch([(20, 24), (20, 24)])
    plain = task.predict(wrapped, batch)
    flipped = predict_semantic(task, wrapped, batch, TTAOptions(flip=True))
    for a, b in zip(plain, flipped):
        assert torch.equal(a["sem_seg"], b["sem_seg"])


def test_flip_averages_the_plain_and_the_unflipped_mirrored_probabilities():
    task, model = SemanticTask(3), ColumnModel()
    batch = _semantic_batch([(16, 20)])
    image = task.normalize(batch["images"])
    plain = model(image)["out"].softmax(1)
    mirrored = model(image.flip(-1))["out"].softmax(1).flip(-1)
    expected = (plain + mirrored)[0] / 2
    probs = semantic_probabilities(task, model, batch, TTAOptions(flip=True))[0]
    torch.testing.assert_close(probs, expected)
    assert not torch.allclose(probs, plain[0], atol=1e-3)  # the flip changed something
    labels = predict_semantic(task, model, batch, TTAOptions(flip=True))[0]["sem_seg"]
    assert torch.equal(labels, expected.argmax(0))


def test_one_plain_pass_equals_the_tasks_own_predict_bit_for_bit():
    task, model = SemanticTask(3), ColumnModel()
    batch = _semantic_batch([(16, 20), (16, 20)])
    for ours, theirs in zip(predict_semantic(task, model, batch, TTAOptions(scales=(1.0,))),
                            task.predict(model, batch)):
        assert torch.equal(ours["sem_seg"], theirs["sem_seg"])


def test_scales_predict_at_the_original_size_of_odd_and_mixed_sizes(compose_cfg):
    cfg = compose_cfg("train", [*TINY])
    task = build_task(cfg, instantiate(cfg.dataset.val).meta, with_loss=False)
    torch.manual_seed(0)
    model = instantiate(cfg.model).eval()
    sizes = [(37, 51), (29, 45), (37, 51)]
    batch = task.collate([(torch.randint(0, 256, (3, h, w), dtype=torch.uint8),
                           {"image_id": i, "orig_size": torch.tensor([h, w])})
                          for i, (h, w) in enumerate(sizes)])
    with torch.no_grad():
        predictions = with_tta(task, TTAOptions(False, (0.75, 1.25))).predict(model, batch)
    for prediction, size in zip(predictions, sizes):
        check_prediction(prediction, size)
        assert prediction["sem_seg"].dtype == torch.int64


def test_sliding_window_inference_runs_inside_every_augmented_pass():
    task = SemanticTask(3, inference={"mode": "slide", "crop_size": [12, 12], "stride": [8, 8]})
    model = ColumnModel()
    batch = _semantic_batch([(20, 26)])
    probs = semantic_probabilities(task, model, batch, TTAOptions(True, (1.0, 1.5)))[0]
    assert tuple(probs.shape) == (3, 20, 26)
    assert max(h for h, _ in model.sizes) <= 12 and max(w for _, w in model.sizes) <= 12  # windows only
    image = task.normalize(batch["images"])
    expected = torch.zeros_like(probs)
    for scale in (1.0, 1.5):
        scaled = image if scale == 1.0 else nn.functional.interpolate(
            image, size=(30, 39), mode="bilinear", align_corners=False)
        for flipped in (False, True):
            x = scaled.flip(-1) if flipped else scaled
            logits = task._slide_logits(model, x)
            logits = logits.flip(-1) if flipped else logits
            logits = nn.functional.interpolate(logits, size=(20, 26), mode="bilinear", align_corners=False)
            expected += logits.softmax(1)[0] / 4
    torch.testing.assert_close(probs, expected)


# --------------------------------------------------------------------------------- Mask R-CNN
def _detector(compose_cfg, model: str, dataset: str, images: int = 2):
    extra = ["model.backbone=resnet18"] if model == "ms_rcnn" else []  # not its R50 default: speed
    cfg = compose_cfg("train", [f"model={model}", f"dataset={dataset}", "dataset.val.num_samples=2",
                                "dataset.val.image_size=64", *SMALL_DETECTOR, *extra])
    val = instantiate(cfg.dataset.val)
    task = build_task(cfg, val.meta, with_loss=False)
    torch.manual_seed(0)
    return task, instantiate(cfg.model).eval(), task.collate([val[i] for i in range(images)])


def _sorted_instances(instances):
    order = torch.argsort(instances["scores"] * 1000 + instances["labels"], descending=True)
    return {k: instances[k][order] for k in ("boxes", "scores", "labels", "masks")}


@pytest.mark.parametrize("model_name", ["maskrcnn_small", "ms_rcnn"])
def test_identical_augmentations_merge_back_into_the_single_prediction(compose_cfg, model_name):
    task, model, batch = _detector(compose_cfg, model_name, "synthetic_instance", images=1)
    with torch.no_grad():
        plain = task.predict(model, batch)
        merged = predict_rcnn(task, model, batch, TWICE)
    assert sum(len(p["instances"]["scores"]) for p in plain) > 0
    for a, b in zip(plain, merged):
        a, b = _sorted_instances(a["instances"]), _sorted_instances(b["instances"])
        assert len(a["scores"]) == len(b["scores"])  # N duplicates per detection -> one
        torch.testing.assert_close(b["boxes"], a["boxes"])
        torch.testing.assert_close(b["scores"], a["scores"])
        assert torch.equal(b["labels"], a["labels"])
        assert torch.equal(b["masks"], a["masks"])  # (p + p) / 2 = p


def test_flip_tta_of_a_mirrored_image_is_the_mirrored_prediction(compose_cfg):
    task, model, batch = _detector(compose_cfg, "maskrcnn_small", "synthetic_instance", images=1)
    mirrored = {**batch, "images": [image.flip(-1) for image in batch["images"]]}
    with torch.no_grad():
        ours = predict_rcnn(task, model, batch, TTAOptions(True))
        theirs = predict_rcnn(task, model, mirrored, TTAOptions(True))
        plain = task.predict(model, batch)
    width = batch["images"][0].shape[-1]
    assert sum(len(p["instances"]["scores"]) for p in ours) > 0
    for a, b, p, size in zip(ours, theirs, plain, [(64, 64)]):
        check_prediction(a, size)
        a, b = _sorted_instances(a["instances"]), _sorted_instances(b["instances"])
        torch.testing.assert_close(a["scores"], b["scores"])
        back = torch.stack([width - b["boxes"][:, 2], b["boxes"][:, 1], width - b["boxes"][:, 0],
                            b["boxes"][:, 3]], dim=1)
        torch.testing.assert_close(a["boxes"], back, atol=1e-3, rtol=0)
        # pasting rounds box corners to pixels: a mask edge may move by a pixel
        agree = (a["masks"] == b["masks"].flip(-1)).float().mean()
        assert agree > 0.99
        assert not torch.equal(a["masks"], _sorted_instances(p["instances"])["masks"]) or \
            len(a["scores"]) != len(p["instances"]["scores"])  # the flip did change the output


def test_merge_keeps_the_best_of_overlapping_same_class_boxes_only():
    box = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    parts = [(box, torch.tensor([0.6]), torch.tensor([1])),
             (box + 0.2, torch.tensor([0.9]), torch.tensor([1])),  # the same object, better score
             (box, torch.tensor([0.5]), torch.tensor([2])),  # the same place, another class
             (box + 30, torch.tensor([0.4]), torch.tensor([1]))]  # elsewhere
    boxes, scores, labels = _merge(parts, 0.5, 100)
    assert scores.tolist() == pytest.approx([0.9, 0.5, 0.4])
    assert labels.tolist() == [1, 2, 1]
    assert _merge(parts, 0.5, 2)[1].tolist() == pytest.approx([0.9, 0.5])  # detections_per_img


def test_panoptic_fpn_tta_gives_the_contract_and_undoes_identical_passes(compose_cfg):
    task, model, batch = _detector(compose_cfg, "panoptic_fpn_small", "synthetic_panoptic", images=1)
    task.instance_score_thresh, task.stuff_area_thresh = 0.0, 1
    with torch.no_grad():
        plain = task.predict(model, batch)
        twice = predict_rcnn(task, model, batch, TWICE)
        flipped = with_tta(task, TTAOptions(True, (0.75,))).predict(model, batch)
    for a, b, c in zip(plain, twice, flipped):
        check_prediction(b, (64, 64))  # one image: the merge loops per instance in Python
        check_prediction(c, (64, 64))
        assert set(c) == {"instances", "panoptic", "segments", "sem_seg"}
        assert torch.equal(a["sem_seg"], b["sem_seg"])
        assert torch.equal(a["panoptic"] > 0, b["panoptic"] > 0)


# -------------------------------------------------------------------------------- Mask2Former
def test_query_average_blends_agreeing_queries_and_keeps_the_reference_for_drifted_ones():
    ref_masks = torch.full((2, 4, 4), -5.0)
    ref_masks[0, :2] = 5.0  # query 0: the top half
    ref_masks[1, :, :2] = 5.0  # query 1: the left half
    other = ref_masks.clone()
    other[0, :2] = 3.0  # query 0: the same object, less sure
    other[1] = -ref_masks[1]  # query 1: another object (the right half)
    classes = torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    other_classes = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 3.0]])
    average = QueryAverage()
    average.add(classes, ref_masks)
    average.add(other_classes, other)
    class_logits, mask_logits = average.averaged()
    torch.testing.assert_close(class_logits.softmax(-1)[0],
                               (classes[0].softmax(-1) + other_classes[0].softmax(-1)) / 2)
    torch.testing.assert_close(mask_logits.sigmoid()[0], (ref_masks[0].sigmoid() + other[0].sigmoid()) / 2)
    torch.testing.assert_close(class_logits.softmax(-1)[1], classes[1].softmax(-1))
    torch.testing.assert_close(mask_logits[1], ref_masks[1], atol=1e-4, rtol=1e-4)


def test_mask2former_tta_gives_every_output_and_identical_passes_change_nothing(compose_cfg):
    cfg = compose_cfg("train", ["model=mask2former", "dataset=synthetic_panoptic",
                                "dataset.val.num_samples=2", "dataset.val.image_size=64", *SMALL_MASK2FORMER])
    val = instantiate(cfg.dataset.val)
    task = build_task(cfg, val.meta, with_loss=False)
    torch.manual_seed(0)
    model = instantiate(cfg.model).eval()
    image, target = val[1]
    small = (image[:, :48, :40], {"image_id": 5, "orig_size": torch.tensor([48, 40])})  # a new image
    batch = task.collate([val[0], small])
    with torch.no_grad():
        plain = task.predict(model, batch)
        twice = predict_mask2former(task, model, batch, TWICE)
        augmented = with_tta(task, TTAOptions(True, (0.75,))).predict(model, batch)
    for a, b, c, size in zip(plain, twice, augmented, [(64, 64), (48, 40)]):
        check_prediction(c, size)
        assert set(c) == set(a)
        assert torch.equal(a["sem_seg"], b["sem_seg"])
        torch.testing.assert_close(a["instances"]["scores"], b["instances"]["scores"], atol=1e-4, rtol=1e-4)
        assert torch.equal(a["panoptic"], b["panoptic"])


# -------------------------------------------------------------------------- spatial embeddings
def _embeddings_task(compose_cfg):
    cfg = compose_cfg("train", ["model=spatial_embeddings", "dataset=synthetic_cells",
                                "dataset.val.num_samples=1", "dataset.val.image_size=64"])
    val = instantiate(cfg.dataset.val)
    return build_task(cfg, val.meta, with_loss=False), val


def test_embedding_maps_mirror_back_with_the_x_offset_negated_and_rescale(compose_cfg):
    task, _ = _embeddings_task(compose_cfg)
    channels = 2 + 1 + task.num_things
    conv = nn.Conv2d(3, channels, 1)  # per pixel: a mirrored input gives the mirrored maps
    model = lambda x: {"out": conv(x)}  # noqa: E731
    images = torch.randint(0, 256, (1, 3, 12, 17)).float()
    with torch.no_grad():
        plain = task._maps(model, images)
        emb, sigma, seeds = averaged_maps(task, model, images, TTAOptions(True))
        torch.testing.assert_close(emb[:, 0], plain[3][0][None])  # x offsets cancel: grid only
        torch.testing.assert_close(emb[:, 1], plain[0][:, 1])
        torch.testing.assert_close(sigma, plain[1])
        torch.testing.assert_close(seeds, plain[2])
        nn.init.zeros_(conv.weight)  # constant maps: offset t, sigma b
        emb, sigma, _ = averaged_maps(task, model, images, TTAOptions(False, (1.0, 2.0)))
    t, b = torch.tanh(conv.bias[:2]), conv.bias[2]
    torch.testing.assert_close(emb[0, :, 3, 5] - torch.tensor([5.0, 3.0]) / task.coord_scale, 0.75 * t)
    torch.testing.assert_close(sigma[0, 0, 3, 5], b + math.log(2.0) / 10)  # bandwidth x 4 at 2x


def test_embedding_tta_of_identical_passes_is_the_plain_prediction(compose_cfg):
    task, val = _embeddings_task(compose_cfg)
    torch.manual_seed(0)
    model = instantiate(compose_cfg("train", ["model=spatial_embeddings", "dataset=synthetic_cells"]).model)
    batch = task.collate([val[0]])
    model.eval()
    channels = model(torch.zeros(1, 3, 32, 32))["out"].shape[1]
    lift, gain = torch.zeros(1, channels, 1, 1), torch.ones(1, channels, 1, 1)
    # clusters from random weights: seeds up, offsets small, a bandwidth of ~40 pixels
    lift[:, -task.num_things:], gain[:, :2] = 4.0, 0.01
    lift[:, 2:-task.num_things], gain[:, 2:-task.num_things] = 0.6, 0.01
    biased = lambda x: {"out": model(x)["out"] * gain + lift}  # noqa: E731
    with torch.no_grad():
        plain = task.predict(biased, batch)
        twice = predict_spatial_embeddings(task, biased, batch, TWICE)
        flipped = with_tta(task, TTAOptions(True, (0.75, 1.0))).predict(biased, batch)
    assert len(plain[0]["instances"]["scores"]) > 0
    for key in ("masks", "labels", "scores"):
        torch.testing.assert_close(twice[0]["instances"][key], plain[0]["instances"][key])
    check_prediction(flipped[0], (64, 64))


# ------------------------------------------------------------------------------------------ CLI
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("tta_cli")
    trained = run_cli("train", *TINY, "dataset.val.num_samples=4", f"hydra.run.dir={work / 'run'}", cwd=work)
    assert trained.returncode == 0, trained.stderr
    return work, work / "run" / "checkpoints" / "last.pt"


@pytest.mark.slow
def test_eval_and_predict_take_tta_from_the_command_line(tiny_run, tmp_path):
    work, ckpt = tiny_run
    flipped = run_cli("eval", f"ckpt={ckpt}", "tta=flip", "tta.scales=[0.75,1.0]",
                      f"output={tmp_path / 'tta.json'}", cwd=tmp_path)
    assert flipped.returncode == 0, flipped.stderr
    plain = json.loads((work / "run" / "metrics.json").read_text())  # the run's eval of the last step
    augmented = json.loads((tmp_path / "tta.json").read_text())
    assert set(augmented) == {"semantic"}
    # the augmentation ran: a 6-step model is far from flip- and scale-invariant
    assert augmented["semantic"]["mIoU"] != plain["semantic"]["mIoU"]
    export_semantic(_val_set([*TINY, "dataset.val.num_samples=4"]), tmp_path / "data")
    images = tmp_path / "data" / "images"
    predicted = run_cli("predict", f"ckpt={ckpt}", f"input={images}", f"output={tmp_path / 'out'}",
                        "tta=flip", "overlay=false", "num_workers=0", cwd=tmp_path)
    assert predicted.returncode == 0, predicted.stderr
    assert len(list((tmp_path / "out").rglob("*.png"))) == 4


@pytest.mark.slow
@pytest.mark.parametrize("command, ckpt_name, args, key", [
    ("eval", "last.pt", ["tta=flip", "tta.scales=[0,1]"], "tta.scales="),
    ("predict", "last.pt", ["+tta.mirror=true"], "tta.mirror"),
    ("predict", "model.onnx", ["tta=flip"], "runs on a PyTorch checkpoint"),  # exports: no TTA
])
def test_bad_tta_values_end_the_cli_with_an_error_naming_the_key(tmp_path, command, ckpt_name, args, key):
    ckpt = tmp_path / ckpt_name  # never read: the options are checked first
    ckpt.write_bytes(b"")
    extra = [f"input={ckpt}", f"output={tmp_path / 'out'}"] if command == "predict" else []
    result = run_cli(command, f"ckpt={ckpt}", *extra, *args, cwd=tmp_path)
    assert result.returncode != 0
    assert key in result.stderr, result.stderr
