"""Mask2Former's task adapter: the "segments" view of semantic, instance and panoptic data (crowds,
VOID and padding ignored), the mode the data decides, the outputs each mode predicts, and the
CLI end to end (train -> eval reproduces the run's numbers -> predict writes all three formats
-> score equals eval)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_cli
from hydra.utils import instantiate

from segtrain.builders import build_task, resolve_task_mode
from segtrain.data.meta import DatasetMeta, default_palette
from segtrain.tasks.mask2former import Mask2FormerTask, guess_mode

SMALL_MODEL = ["model.backbone=resnet18", "model.hidden_dim=32", "model.mask_dim=32", "model.num_queries=8",
               "model.nheads=4", "model.dim_feedforward=64", "model.dec_layers=3", "model.enc_layers=1",
               "model.enc_dim_feedforward=64", "model.num_points=256"]


def _setup(compose_cfg, dataset: str, *extra: str):
    cfg = compose_cfg("train", ["model=mask2former", f"dataset={dataset}", "dataset.val.num_samples=4",
                                "dataset.val.image_size=64", *SMALL_MODEL, *extra])
    val = instantiate(cfg.dataset.val)
    resolve_task_mode(cfg, val)
    return cfg, val, build_task(cfg, val.meta)


@pytest.mark.parametrize(("dataset", "mode", "evaluators"), [
    ("synthetic", "semantic", ["semantic"]),
    ("synthetic_instance", "instance", ["coco"]),
    ("synthetic_panoptic", "panoptic", ["panoptic", "coco", "semantic"]),
])
def test_the_dataset_decides_the_mode_and_the_evaluators(compose_cfg, dataset, mode, evaluators):
    cfg, _, task = _setup(compose_cfg, dataset)
    assert cfg.task.mode == mode and task.mode == mode  # stored resolved: eval and predict reuse it
    assert task.evaluators == evaluators


def test_semantic_data_with_thing_classes_still_trains_semantic():
    """Cityscapes' semantic set has thing classes in its metadata but only label maps: without a
    dataset.annotations key the targets, not the metadata, decide."""
    class Items:
        def __len__(self):
            return 1

        def __getitem__(self, i):
            return torch.zeros(3, 4, 4, dtype=torch.uint8), {"semantic": torch.zeros(4, 4), "image_id": 0}

    from omegaconf import OmegaConf

    target = "segtrain.tasks.mask2former.Mask2FormerTask"
    cfg = OmegaConf.create({"task": {"_target_": target, "mode": "auto"}})
    # a dataset config without `annotations` (a user's own): the targets decide
    meta = DatasetMeta(["road", "car", "sky"], default_palette(3), thing_ids=[1], stuff_ids=[0, 2])
    assert guess_mode(meta) == "panoptic"
    resolve_task_mode(cfg, Items())
    assert cfg.task.mode == "semantic"


def _canvas_covered_once(segments: dict) -> None:
    """Masks are disjoint and, with the ignored pixels, cover the canvas (semantic and panoptic)."""
    cover = segments["masks"].sum(0) + segments["ignore"].long()
    assert bool((cover == 1).all())


def test_semantic_segments_one_per_class_present_ignore_and_padding_ignored(compose_cfg):
    _, val, task = _setup(compose_cfg, "synthetic")
    image, target = val[0]
    target = {**target, "semantic": target["semantic"].clone()}
    target["semantic"][:3, :5] = 255
    seg = task.segments(target, (96, 64 + 32))
    present = torch.unique(target["semantic"][target["semantic"] != 255])
    assert seg["labels"].tolist() == present.tolist()
    for label, mask in zip(seg["labels"], seg["masks"]):
        assert torch.equal(mask[:64, :64], target["semantic"] == label)
    ignore = seg["ignore"]
    assert bool(ignore[:3, :5].all()) and bool(ignore[64:].all()) and bool(ignore[:, 64:].all())
    _canvas_covered_once(seg)


def test_instance_segments_map_labels_to_classes_and_ignore_crowds(compose_cfg):
    _, val, task = _setup(compose_cfg, "synthetic_instance")
    _, target = val[0]
    n = len(target["labels"])
    assert n >= 2, "the test needs two objects"
    crowd = torch.zeros(n, dtype=torch.int64)
    crowd[0] = 1
    seg = task.segments({**target, "iscrowd": crowd}, (64, 64))
    assert seg["labels"].tolist() == [val.meta.thing_ids[int(k) - 1] for k in target["labels"][1:]]
    assert torch.equal(seg["masks"], target["masks"][1:].bool())
    assert torch.equal(seg["ignore"], target["masks"][0].bool())


def test_panoptic_segments_are_things_and_stuff_with_crowds_and_void_ignored(compose_cfg):
    _, val, task = _setup(compose_cfg, "synthetic_panoptic")
    found_crowd = False
    for i in range(len(val)):
        _, target = val[i]
        seg = task.segments(target, (64, 64))
        segments = target["segments"]
        crowd = segments["iscrowd"].bool()
        assert seg["labels"].tolist() == segments["classes"][~crowd].tolist()
        labels = set(seg["labels"].tolist())
        assert labels & set(val.meta.stuff_ids) and labels & set(val.meta.thing_ids)
        void_or_crowd = (target["panoptic"] == 0) | torch.isin(target["panoptic"], segments["ids"][crowd])
        assert torch.equal(seg["ignore"], void_or_crowd)
        _canvas_covered_once(seg)
        found_crowd |= bool(crowd.any())
    assert found_crowd, "the test needs a crowd segment among the samples"


@pytest.mark.parametrize("dataset", ["synthetic", "synthetic_instance", "synthetic_panoptic"])
def test_training_step_and_predictions_per_mode(compose_cfg, dataset):
    from segtrain.predictions import check_prediction

    torch.manual_seed(0)
    cfg, val, task = _setup(compose_cfg, dataset)
    model = instantiate(cfg.model)
    batch = task.collate([val[0], val[1]])
    assert batch["images"].shape[-2:] == (64, 64)
    losses = task.training_step(model.train(), batch)
    assert set(losses) == {"loss", "loss_ce", "loss_mask", "loss_dice", "loss_aux"}
    assert all(bool(torch.isfinite(v)) for v in losses.values())
    torch.testing.assert_close(losses["loss"], losses["loss_ce"] + losses["loss_mask"] + losses["loss_dice"]
                               + losses["loss_aux"])
    image, target = val[2]
    small = (image[:, :45, :50], {"image_id": 9, "orig_size": torch.tensor([90, 100])})  # resized input
    batch = task.collate([val[0], small])
    assert "train_targets" not in batch  # new images: nothing to learn from
    with torch.no_grad():
        predictions = task.predict(model.eval(), batch)
    for prediction, size in zip(predictions, [(64, 64), (90, 100)]):
        check_prediction(prediction, size)
        assert set(prediction) - {"segments"} == set(task.prediction_keys)
    if "instances" in task.prediction_keys:
        labels = predictions[0]["instances"]["labels"]
        assert bool(((labels >= 1) & (labels <= len(val.meta.thing_ids))).all())


def test_bad_options_name_the_key():
    meta = DatasetMeta(["a", "b"], default_palette(2), stuff_ids=[0, 1])
    with pytest.raises(ValueError, match="task.mode"):
        Mask2FormerTask(meta, mode="detection")
    with pytest.raises(ValueError, match="thing_ids"):
        Mask2FormerTask(meta, mode="panoptic")
    with pytest.raises(KeyError, match="loss_cls"):
        Mask2FormerTask(meta, loss_weights={"loss_cls": 1.0})
    with pytest.raises(ValueError, match="task.overlap_threshold"):
        Mask2FormerTask(meta, overlap_threshold=1.5)


# ------------------------------------------------------------------------------------- the CLI
TINY = ["experiment=synthetic_mask2former", "dataset.train.num_samples=16", "dataset.val.num_samples=4",
        *SMALL_MODEL, "data.batch_size=4", "data.num_workers=1", "trainer.max_iters=30",
        "trainer.eval_every=30", "trainer.ckpt_every=30", "trainer.device=cpu", "trainer.vis_images=1",
        "task.object_mask_threshold=0.3", "optimizer.lr=0.002"]


@pytest.mark.slow
def test_train_eval_predict_score_from_one_checkpoint(tmp_path):
    from test_predict_cli import _assert_close, _val_set

    from segtrain.data.export.panoptic import write_coco_panoptic

    trained = run_cli("train", *TINY, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr[-3000:]
    run_metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert {"panoptic", "segm", "bbox", "semantic"} <= set(run_metrics)  # one evaluation, every family
    assert run_metrics["semantic"]["mIoU"] > 0 and run_metrics["segm"]["AP"] >= 0
    ckpt = tmp_path / "run" / "checkpoints" / "last.pt"
    evaluated = run_cli("eval", f"ckpt={ckpt}", f"output={tmp_path / 'eval.json'}", cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert json.loads((tmp_path / "eval.json").read_text()) == run_metrics

    gt_json = write_coco_panoptic(_val_set(TINY), tmp_path / "coco")
    out = tmp_path / "out"
    predicted = run_cli("predict", f"ckpt={ckpt}", f"input={tmp_path / 'coco' / 'val2017'}", f"output={out}",
                        "batch_size=2", "num_workers=0", cwd=tmp_path)
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    for kind in ("panoptic", "semantic"):
        assert len(list((out / kind).glob("*.png"))) == 4, kind
    assert json.loads((out / "instances.json").read_text())["annotations"], "instances were written"
    scored = run_cli("score", "task=panoptic", f"gt={gt_json}", f"gt_dir={gt_json.with_suffix('')}",
                     f"pred={out / 'panoptic.json'}", f"pred_dir={out / 'panoptic'}",
                     f"output={tmp_path / 'score.json'}", cwd=tmp_path)
    assert scored.returncode == 0, scored.stderr[-3000:]
    score = json.loads((tmp_path / "score.json").read_text())["panoptic"]
    _assert_close(score, run_metrics["panoptic"], [k for k in run_metrics["panoptic"] if k != "per_class"])


def test_test_size_resizes_what_the_model_sees_and_outputs_stay_at_the_original_size(compose_cfg):
    from segtrain.predictions import check_prediction

    torch.manual_seed(0)
    cfg, val, _ = _setup(compose_cfg, "synthetic_panoptic")
    task = Mask2FormerTask(val.meta, mode="panoptic", test_size=[100, 120])
    model = instantiate(cfg.model).eval()
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape)))
    image, target = val[0]
    wide = (image[:, :40, :], {"image_id": 5, "orig_size": torch.tensor([40, 64])})
    with torch.no_grad():
        predictions = task.predict(model, task.collate([val[0], wide]))
    # 64x64 -> short side 100 (long 100 <= 120); 40x64 -> 75x120 (the long side caps it)
    assert seen == [(2, 3, 128, 128)]
    check_prediction(predictions[0], (64, 64))
    check_prediction(predictions[1], (40, 64))
    with pytest.raises(ValueError, match="task.test_size"):
        Mask2FormerTask(val.meta, test_size=[800])
