"""Every model config, through its adapter (task), predicts the one format of segtrain.predictions,
and its default evaluators score those predictions against its dataset's targets."""

from __future__ import annotations

import pytest
import torch
from conftest import ROOT
from hydra.utils import instantiate

from segtrain.builders import build_task
from segtrain.metrics.build import EVALUATORS
from segtrain.predictions import check_prediction, instance_meta, semantic_labels

MODEL_NAMES = sorted(p.stem for p in (ROOT / "conf" / "model").glob("*.yaml"))
# The synthetic dataset a model family trains on, by the task its config selects.
DATASET_OF_TASK = {"semantic": "synthetic", "instance": "synthetic_instance",
                   "panoptic": "synthetic_panoptic", "mask2former": "synthetic_panoptic",
                   "spatial_embeddings": "synthetic_cells"}
SMALL_DETECTOR = ["model.min_size=64", "model.max_size=64", "model.rpn_pre_nms_top_n_test=50",
                  "model.rpn_post_nms_top_n_test=20"]


def _compose(compose_cfg, model: str, extra: list[str] = ()):
    task_name = compose_cfg("train", [f"model={model}"]).task._target_.split(".")[-2]
    overrides = [f"model={model}", f"dataset={DATASET_OF_TASK[task_name]}", "dataset.val.num_samples=2",
                 "dataset.val.image_size=64", *extra]
    if task_name in ("instance", "panoptic"):
        overrides += SMALL_DETECTOR
    return compose_cfg("train", overrides), task_name


@pytest.mark.parametrize("model_name", MODEL_NAMES)
def test_every_model_predicts_the_contract_and_its_evaluators_score_it(compose_cfg, model_name):
    cfg, task_name = _compose(compose_cfg, model_name)
    val = instantiate(cfg.dataset.val)
    task = build_task(cfg, val.meta, with_loss=False)
    torch.manual_seed(0)
    model = instantiate(cfg.model).eval()
    # one image cut smaller: predictions must follow each image's own size
    image, target = val[1]
    small = (image[:, :48, :40], {**target, "orig_size": torch.tensor([48, 40])})
    for key in ("semantic", "masks", "boxes", "labels", "iscrowd", "panoptic", "segments"):
        small[1].pop(key, None)  # a new image: no annotations
    batch = task.collate([val[0], small])
    with torch.no_grad():
        predictions = task.predict(model, batch)
    assert len(predictions) == 2
    for prediction, size in zip(predictions, [(64, 64), (48, 40)]):
        check_prediction(prediction, size)
        assert set(prediction) - {"segments"} == set(task.prediction_keys)
    for name in task.evaluators:  # every default evaluator reads a key the model predicts
        assert EVALUATORS[name][0] in task.prediction_keys
    evaluator = task.build_evaluator()
    evaluator.process(batch["targets"][:1], predictions[:1])
    metrics = evaluator.compute()
    families = {family for name in task.evaluators for family in EVALUATORS[name][2]}
    assert set(metrics) == families


def test_panoptic_fpn_reports_pq_mask_ap_and_miou_in_one_pass(compose_cfg):
    cfg, _ = _compose(compose_cfg, "panoptic_fpn_small")
    val = instantiate(cfg.dataset.val)
    task = build_task(cfg, val.meta, with_loss=False)
    assert task.evaluators == ["panoptic", "coco", "semantic"]
    # perfect predictions made from the targets: every evaluator must then score 100
    batch = task.collate([val[0], val[1]])
    predictions = []
    for target in batch["targets"]:
        segments = [{"id": int(i), "category_id": int(c), "isthing": int(c) in val.meta.thing_ids,
                     "score": 1.0}
                    for i, c, crowd in zip(*(target["segments"][k] for k in ("ids", "classes", "iscrowd")))
                    if not crowd]
        kept = torch.tensor([s["id"] for s in segments])
        labels = target["labels"]
        predictions.append({
            "panoptic": torch.where(torch.isin(target["panoptic"], kept), target["panoptic"], 0).int(),
            "segments": segments,
            "sem_seg": torch.where(target["semantic"] == 255, 0, target["semantic"]),
            "instances": {"masks": target["masks"], "boxes": target["boxes"].float(), "labels": labels,
                          "scores": torch.ones(len(labels))}})
    evaluator = task.build_evaluator()
    evaluator.process(batch["targets"], predictions)
    metrics = evaluator.compute()
    assert metrics["panoptic"]["PQ"] == pytest.approx(100.0)
    assert metrics["segm"]["AP"] == pytest.approx(100.0) and metrics["bbox"]["AP"] == pytest.approx(100.0)
    assert metrics["semantic"]["mIoU"] == pytest.approx(100.0)
    # COCO results name the dataset's thing categories, not the first contiguous ids
    assert instance_meta(val.meta).classes[1:] == [val.meta.classes[k] for k in val.meta.thing_ids]


def test_evaluators_are_config_and_wrong_ones_are_named(compose_cfg):
    cfg, _ = _compose(compose_cfg, "unet", ["evaluators=[semantic]"])
    val = instantiate(cfg.dataset.val)
    assert build_task(cfg, val.meta).evaluators == ["semantic"]
    for names, fragment in ((["panoptic"], "predicts only sem_seg"), (["semantics"], "unknown"),
                            (["semantic", "semantic"], "once")):
        cfg, _ = _compose(compose_cfg, "unet", [f"evaluators=[{','.join(names)}]"])
        with pytest.raises(ValueError, match=fragment):
            build_task(cfg, val.meta)


def test_semantic_labels_reads_label_maps_and_scores_alike():
    labels = torch.tensor([[0, 2], [1, 1]])
    scores = torch.nn.functional.one_hot(labels, 3).permute(2, 0, 1).float()
    assert torch.equal(semantic_labels(labels), labels) and torch.equal(semantic_labels(scores), labels)
    with pytest.raises(ValueError, match="label map"):
        semantic_labels(torch.zeros(2, 2))  # float without a class axis
