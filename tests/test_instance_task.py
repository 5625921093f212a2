"""InstanceTask: list batches, crowd handling, weighted Mask R-CNN losses, predictions, visuals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from segtrain.builders import build_task
from segtrain.data.datasets.synthetic import SyntheticDataset
from segtrain.engine.evaluation import autocast_context, evaluate_model
from segtrain.models.maskrcnn import build_maskrcnn
from segtrain.predictions import check_prediction
from segtrain.tasks.instance import LOSS_NAMES, InstanceTask

SMALL_YAML = Path(__file__).resolve().parents[1] / "conf" / "model" / "maskrcnn_small.yaml"


@pytest.fixture(scope="module")
def dataset() -> SyntheticDataset:
    return SyntheticDataset(split="train", num_samples=8, image_size=64, num_classes=6, seed=0)


@pytest.fixture
def task(dataset) -> InstanceTask:
    return InstanceTask(num_classes=6, meta=dataset.meta)


def _tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_maskrcnn(
        6, backbone="resnet18", min_size=64, max_size=64, rpn_pre_nms_top_n_train=50,
        rpn_post_nms_top_n_train=20, rpn_pre_nms_top_n_test=50, rpn_post_nms_top_n_test=20,
        box_batch_size_per_image=16, representation_size=64, mask_head_channels=16,
    )


def _crowd(sample, which: slice):
    """The sample with the instances at `which` marked as crowd regions."""
    image, target = sample
    target = dict(target)
    target["iscrowd"] = target["iscrowd"].clone()
    target["iscrowd"][which] = 1
    return image, target


class FixedLosses(nn.Module):
    """Returns a fixed Mask R-CNN loss dict and records what it was called with."""

    def forward(self, images, targets=None):
        self.images, self.targets = images, targets
        return {name: torch.tensor(float(i + 1)) for i, name in enumerate(LOSS_NAMES)}


# ---------------------------------------------------------------------------------- batching
def test_collate_keeps_crowd_for_evaluation_and_drops_it_from_training_targets(task, dataset):
    first, second = dataset[0], _crowd(dataset[1], slice(0, 1))
    batch = task.collate([first, second])
    assert [tuple(image.shape) for image in batch["images"]] == [(3, 64, 64)] * 2
    assert all(type(image) is torch.Tensor and image.dtype == torch.uint8 for image in batch["images"])
    n = len(second[1]["labels"])
    assert len(batch["targets"][1]["labels"]) == n and batch["targets"][1]["iscrowd"][0] == 1
    kept = batch["train_targets"][1]
    assert len(kept["labels"]) == n - 1 and torch.equal(kept["labels"], second[1]["labels"][1:])
    assert kept["masks"].shape == (n - 1, 64, 64) and kept["boxes"].shape == (n - 1, 4)
    assert set(kept) == {"boxes", "labels", "masks"}
    assert len(batch["train_targets"][0]["labels"]) == len(first[1]["labels"])
    assert task.batch_size(batch) == 2


def test_collate_drops_degenerate_boxes_and_rejects_labels_out_of_range(task, dataset):
    image, target = dataset[0]
    target = dict(target, boxes=target["boxes"].clone())
    target["boxes"][0, 2] = target["boxes"][0, 0]  # zero width
    batch = task.collate([(image, target)])
    assert len(batch["train_targets"][0]["labels"]) == len(target["labels"]) - 1
    target["labels"] = target["labels"].clone()
    target["labels"][0] = 6
    with pytest.raises(ValueError, match=r"image_id 0: instance labels .*outside 1\.\.5"):
        task.collate([(image, target)])


def test_to_device_moves_images_and_every_target_tensor(task, dataset):
    batch = task.to_device(task.collate([dataset[0]]), torch.device("meta"))
    assert batch["images"][0].device.type == "meta"
    assert batch["targets"][0]["masks"].device.type == "meta"
    assert batch["train_targets"][0]["boxes"].device.type == "meta"
    assert batch["targets"][0]["image_id"] == 0
    # No instance dropped: training and evaluation targets share the moved masks.
    assert batch["train_targets"][0]["masks"] is batch["targets"][0]["masks"]


# ---------------------------------------------------------------------------------- training
def test_training_step_weights_each_loss_and_sums_them(dataset):
    task = InstanceTask(6, meta=dataset.meta, loss_weights={"loss_mask": 2.0, "loss_classifier": 0.5})
    model = FixedLosses()
    losses = task.training_step(model, task.collate([dataset[0]]))
    expected = {"loss_classifier": 0.5, "loss_box_reg": 2.0, "loss_mask": 6.0,
                "loss_objectness": 4.0, "loss_rpn_box_reg": 5.0}
    assert {k: v.item() for k, v in losses.items() if k != "loss"} == expected
    assert losses["loss"].item() == pytest.approx(sum(expected.values()))
    # The model sees float images in [0, 1] and the training targets.
    assert model.images[0].dtype == torch.float32 and float(model.images[0].max()) <= 1.0
    assert set(model.targets[0]) == {"boxes", "labels", "masks"}


def test_unknown_loss_weight_names_the_valid_losses(dataset):
    with pytest.raises(KeyError, match="loss_msk.*loss_mask"):
        InstanceTask(6, meta=dataset.meta, loss_weights={"loss_msk": 1.0})


def test_real_training_step_gives_every_loss_finite_even_without_instances(task, dataset):
    model = _tiny_model().train()
    all_crowd = _crowd(dataset[2], slice(None))
    batch = task.collate([dataset[0], all_crowd])
    assert len(batch["train_targets"][1]["labels"]) == 0
    losses = task.training_step(model, batch)
    assert set(losses) == {*LOSS_NAMES, "loss"}
    assert all(torch.isfinite(v) for v in losses.values())
    losses["loss"].backward()


def test_bf16_autocast_training_step_on_cpu_is_finite(task, dataset):
    model = _tiny_model().train()
    batch = task.collate([dataset[0], dataset[1]])
    with autocast_context(torch.device("cpu"), "bf16"):
        losses = task.training_step(model, batch)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
    losses["loss"].backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_a_few_steps_of_the_small_preset_reduce_the_loss(task):
    cfg = OmegaConf.merge({"dataset": {"num_classes": 6}}, {"model": OmegaConf.load(SMALL_YAML)})
    cfg.model.pop("defaults")
    torch.manual_seed(0)
    model = instantiate(cfg.model).train()
    data = SyntheticDataset(num_samples=2, image_size=128, num_classes=6, seed=1)
    batch = task.collate([data[0], data[1]])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    history = []
    for _ in range(8):
        loss = task.training_step(model, batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(loss.item())
    assert sum(history[-3:]) / 3 < 0.7 * history[0], history


# -------------------------------------------------------------------------------- prediction
class FixedDetections(nn.Module):
    """Eval-mode stand-in: two detections whose mask probabilities are 0.4 and 0.6 everywhere."""

    def forward(self, images):
        outputs = []
        for image in images:
            h, w = image.shape[-2:]
            masks = torch.stack([torch.full((1, h, w), 0.4), torch.full((1, h, w), 0.6)])
            outputs.append({"boxes": torch.tensor([[0.0, 0.0, w / 2, h / 2], [1.0, 2.0, w, h]]),
                            "labels": torch.tensor([1, 2]), "scores": torch.tensor([0.9, 0.3]),
                            "masks": masks.to(torch.bfloat16)})
        return outputs


def test_predict_thresholds_masks_at_half_and_returns_them_at_the_original_size(task, dataset):
    image, target = dataset[0]
    small = (image[:, ::2, ::2], dict(target))  # a loader that resized 64 -> 32; orig_size stays
    batch = task.collate([dataset[1], small])
    predictions = [p["instances"] for p in task.predict(FixedDetections(), batch)]
    for prediction in predictions:
        assert prediction["masks"].dtype == torch.bool and prediction["masks"].shape == (2, 64, 64)
        assert not prediction["masks"][0].any() and prediction["masks"][1].all()
        assert prediction["scores"].dtype == torch.float32 and prediction["labels"].dtype == torch.int64
    assert predictions[0]["boxes"].tolist() == [[0, 0, 32, 32], [1, 2, 64, 64]]
    assert predictions[1]["boxes"].tolist() == [[0, 0, 32, 32], [2, 4, 64, 64]]  # scaled by 2


def test_real_model_predictions_match_the_images(task, dataset):
    model = _tiny_model().eval()
    batch = task.collate([dataset[0], dataset[1]])
    with torch.no_grad():
        predictions = task.predict(model, batch)
    for prediction in predictions:
        check_prediction(prediction, (64, 64))
        prediction = prediction["instances"]
        n = len(prediction["scores"])
        assert prediction["masks"].shape == (n, 64, 64) and prediction["masks"].dtype == torch.bool
        assert prediction["boxes"].shape == (n, 4)


def test_evaluation_loop_feeds_the_evaluator_and_visualizes(task, dataset):
    class Recorder:
        def reset(self):
            self.seen = []

        def process(self, targets, predictions):
            self.seen.append((len(targets), len(predictions)))

        def compute(self):
            return {"segm": {"AP": 0.0}}

    loader = torch.utils.data.DataLoader([dataset[i] for i in range(3)], batch_size=2,
                                         collate_fn=task.collate)
    evaluator = Recorder()
    metrics, kept = evaluate_model(FixedDetections(), task, loader, evaluator,
                                   torch.device("cpu"), keep_first=1)
    assert evaluator.seen == [(2, 2), (1, 1)] and metrics == {"segm": {"AP": 0.0}}
    grid = task.visualize(*kept[0], max_images=2)
    assert grid.dtype == torch.uint8 and grid.shape == (3, 2 * 64, 3 * 64)
    assert not torch.equal(grid[:, :64, 64:128], grid[:, :64, :64]), "detections are drawn"


def test_build_evaluator_is_coco_with_mask_areas_and_a_results_file(task, tmp_path):
    from segtrain.metrics.coco import COCOEvaluator

    evaluator = task.build_evaluator(tmp_path).members["coco"]
    assert isinstance(evaluator, COCOEvaluator)
    assert evaluator.area_from == "mask" and tuple(evaluator.iou_types) == ("segm", "bbox")
    assert evaluator.results_path == tmp_path / "coco_instances_results.json"
    assert task.build_evaluator().members["coco"].results_path is None


def test_lvis_evaluator_needs_the_lvis_json(dataset):
    with pytest.raises(ValueError, match="dataset.gt_json"):
        InstanceTask(num_classes=6, meta=dataset.meta, evaluator="lvis")
    with pytest.raises(ValueError, match="expected one of coco, lvis"):
        InstanceTask(num_classes=6, meta=dataset.meta, evaluator="voc")


# -------------------------------------------------------------------------------- config
def test_maskrcnn_config_selects_the_instance_task_with_the_dataset_meta(compose_cfg, dataset):
    cfg = compose_cfg("train", ["model=maskrcnn_small", "task.loss_weights.loss_mask=2.0"])
    task = build_task(cfg, dataset.meta)
    assert isinstance(task, InstanceTask) and task.meta is dataset.meta
    assert task.loss_weights["loss_mask"] == 2.0 and task.gt_json is None
    assert task.primary_metric == "segm/AP"


def test_meta_and_num_classes_must_agree(dataset):
    with pytest.raises(ValueError, match="num_classes=4.*6 classes"):
        InstanceTask(4, meta=dataset.meta)


def test_max_dets_reach_the_coco_evaluator_and_name_its_recall_keys(dataset):
    task = InstanceTask(num_classes=6, meta=dataset.meta, max_dets=[1, 100, 1000])
    evaluator = task.build_evaluator().members["coco"]
    assert evaluator.max_dets == (1, 100, 1000)
    _, target = dataset[0]
    found = {"masks": target["masks"].bool(), "boxes": target["boxes"].float(), "labels": target["labels"],
             "scores": torch.ones(len(target["labels"]))}
    evaluator.process([target], [{"instances": found}])
    metrics = evaluator.compute()
    assert {"AR1", "AR100", "AR1000"} <= set(metrics["segm"]) and "AR10" not in metrics["segm"]
    with pytest.raises(ValueError, match="task.max_dets"):
        InstanceTask(num_classes=6, meta=dataset.meta, max_dets=[100, 10, 1])
