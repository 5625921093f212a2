"""Panoptic FPN model and the panoptic task's training targets and inference merge."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.ops import masks_to_boxes

from segtrain.data.meta import DatasetMeta, default_palette
from segtrain.models.panoptic_fpn import SEMANTIC_LOSS, build_panoptic_fpn
from segtrain.predictions import check_prediction
from segtrain.tasks.panoptic import PanopticTask

SMALL = dict(backbone="resnet18", min_size=64, max_size=64, rpn_pre_nms_top_n_train=50,
             rpn_post_nms_top_n_train=20, rpn_pre_nms_top_n_test=50, rpn_post_nms_top_n_test=20,
             box_batch_size_per_image=16, representation_size=32, mask_head_channels=16,
             box_detections_per_img=10, semantic_channels=32)
# Contiguous classes: two stuff (0, 1), two things (2, 3).
META = DatasetMeta(["sky", "grass", "circle", "square"], default_palette(4), thing_ids=[2, 3],
                   stuff_ids=[0, 1])


def _targets() -> list[dict]:
    masks = torch.zeros(1, 64, 64, dtype=torch.bool)
    masks[0, 8:30, 10:40] = True
    return [{"boxes": torch.tensor([[10.0, 8, 40, 30]]), "labels": torch.tensor([2]), "masks": masks,
             "semantic": torch.randint(0, 3, (64, 64))}]


def test_training_returns_mask_rcnn_losses_plus_the_semantic_loss_and_trains_both_branches():
    torch.manual_seed(0)
    model = build_panoptic_fpn(num_things=2, num_stuff=2, **SMALL).train()
    losses = model([torch.rand(3, 64, 64)], _targets())
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness",
                           "loss_rpn_box_reg", SEMANTIC_LOSS}
    # A fresh 3-class predictor (std 0.001 weights) starts at log(3) cross-entropy.
    assert float(losses[SEMANTIC_LOSS].detach()) == pytest.approx(math.log(3), abs=0.05)
    sum(losses.values()).backward()
    assert model.semantic_head.predictor.weight.grad.abs().sum() > 0
    assert model.backbone.body.layer4[0].conv1.weight.grad.abs().sum() > 0


def test_an_unlabelled_batch_gives_a_zero_semantic_loss_not_nan():
    model = build_panoptic_fpn(num_things=2, num_stuff=2, **SMALL).train()
    targets = _targets()
    targets[0]["semantic"] = torch.full((64, 64), 255)
    loss = model([torch.rand(3, 64, 64)], targets)[SEMANTIC_LOSS]
    assert float(loss.detach()) == 0.0


def test_semantic_targets_follow_the_detectors_resize_and_pad_with_ignore():
    model = build_panoptic_fpn(num_things=2, num_stuff=2, **SMALL)
    label = torch.zeros(32, 48, dtype=torch.int64)
    label[:, 24:] = 2  # right half
    out = model._semantic_targets([label], [(64, 96)], (64, 128))
    assert out.shape == (1, 64, 128)
    assert (out[0, :, :48] == 0).all() and (out[0, :, 48:96] == 2).all() and (out[0, :, 96:] == 255).all()


def test_eval_returns_detections_and_semantic_logits_at_the_input_size():
    model = build_panoptic_fpn(num_things=2, num_stuff=3, **SMALL).eval()
    with torch.no_grad():
        out = model([torch.rand(3, 48, 64)])[0]
    assert out["sem_seg"].shape == (4, 48, 64)
    assert out["masks"].shape[-2:] == (48, 64)


def test_bad_model_options_are_named():
    with pytest.raises(ValueError, match="ResNet FPN"):
        build_panoptic_fpn(num_things=2, num_stuff=2, backbone="mobilenet_v3_large")
    with pytest.raises(ValueError, match="num_stuff=0"):
        build_panoptic_fpn(num_things=2, num_stuff=0, backbone="resnet18")


# ------------------------------------------------------------------------------------ task
def test_training_targets_map_classes_to_the_semantic_branch_layout():
    task = PanopticTask(META)
    target = {**_targets()[0], "image_id": 7, "iscrowd": torch.tensor([0]),
              "semantic": torch.tensor([[0, 1, 2, 3, 255]])}
    out = task._training_target(target)
    assert out["semantic"].tolist() == [[1, 2, 0, 0, 255]]  # stuff 1..S, things 0, ignore kept
    target["semantic"] = torch.tensor([[0, 9]])
    with pytest.raises(ValueError, match="image_id 7: semantic labels"):
        task._training_target(target)


def test_unknown_loss_weight_and_a_meta_without_stuff_are_refused():
    with pytest.raises(KeyError, match="loss_semseg"):
        PanopticTask(META, loss_weights={"loss_semseg": 1.0})
    with pytest.raises(ValueError, match="needs both"):
        PanopticTask(DatasetMeta(["a", "b"], default_palette(2), thing_ids=[0, 1]))


def _output(masks: list[torch.Tensor], scores: list[float], labels: list[int],
            semantic: torch.Tensor) -> dict:
    logits = torch.nn.functional.one_hot(semantic, 3).permute(2, 0, 1).float()
    return {"masks": torch.stack(masks)[:, None].float() if masks else torch.zeros(0, 1, *semantic.shape),
            "scores": torch.tensor(scores), "labels": torch.tensor(labels, dtype=torch.int64),
            "boxes": masks_to_boxes(torch.stack(masks)) if masks else torch.zeros(0, 4), "sem_seg": logits}


def _predict(task: PanopticTask, output: dict, size: tuple[int, int]) -> dict:
    """The task's prediction for one image whose model output is `output` (orig_size `size`)."""
    image = torch.zeros(3, *output["sem_seg"].shape[-2:], dtype=torch.uint8)
    batch = {"images": [image], "targets": [{"orig_size": torch.tensor(size)}]}
    prediction = task.predict(lambda images: [output], batch)[0]
    check_prediction(prediction, size)
    segments = prediction["segments"]
    prediction["columns"] = {"ids": torch.tensor([s["id"] for s in segments], dtype=torch.int64),
                             "classes": torch.tensor([s["category_id"] for s in segments], dtype=torch.int64),
                             "scores": torch.tensor([s["score"] for s in segments])}
    return prediction


def test_merge_places_instances_by_score_then_large_enough_stuff():
    task = PanopticTask(META, instance_score_thresh=0.5, overlap_thresh=0.5, stuff_area_thresh=20)
    a = torch.zeros(10, 10, dtype=torch.bool)
    a[0:4, 0:4] = True  # 16 px, best score
    b = torch.zeros(10, 10, dtype=torch.bool)
    b[2:6, 2:6] = True  # 16 px, 4 of them under a: kept on its 12 free pixels
    c = a.clone()  # entirely under a: dropped (overlap 1 > 0.5)
    d = torch.zeros(10, 10, dtype=torch.bool)
    d[8:10, 8:10] = True  # below the score threshold
    semantic = torch.zeros(10, 10, dtype=torch.int64)
    semantic[:, 5:] = 1  # branch class 1 = meta.stuff_ids[0] = sky
    semantic[9, 0] = 2  # one pixel of branch class 2: below stuff_area_thresh
    out = _predict(task, _output([a, b, c, d], [0.9, 0.8, 0.7, 0.4], [1, 2, 1, 1], semantic), (10, 10))
    pan, seg = out["panoptic"], out["columns"]
    assert [s["isthing"] for s in out["segments"]] == [True, True, False]
    assert seg["ids"].tolist() == [1, 2, 3]
    assert seg["classes"].tolist() == [2, 3, 0]  # circle, square, then sky (branch class 1)
    assert (pan[0:4, 0:4] == 1).all()
    assert int((pan == 2).sum()) == 12 and int((pan[2:6, 2:6] == 2).sum()) == 12
    assert seg["scores"].tolist() == pytest.approx([0.9, 0.8, 1.0])
    # Branch class 0 (things) is never stuff; its pixels and the tiny region stay VOID.
    assert int((pan == 3).sum()) == int(((semantic == 1) & (pan != 1) & (pan != 2)).sum())
    assert pan[9, 0] == 0 and pan[0, 4] == 0
    # sem_seg: each segment's class; VOID pixels the best stuff class of the branch
    assert (out["sem_seg"][pan == 1] == 2).all() and (out["sem_seg"][pan == 3] == 0).all()
    assert out["sem_seg"][9, 0] == 1  # grass: too small for a segment, still its best stuff class
    assert len(out["instances"]["scores"]) == 4  # every detection, thresholds are the merge's


def test_merge_rescales_to_the_original_size():
    task = PanopticTask(META, stuff_area_thresh=1)
    semantic = torch.ones(8, 8, dtype=torch.int64)
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[:4, :4] = True
    out = _predict(task, _output([mask], [0.9], [2], semantic), (16, 16))
    assert out["panoptic"].shape == (16, 16) and out["sem_seg"].shape == (16, 16)
    assert out["instances"]["masks"].shape == (1, 16, 16)
    assert out["columns"]["classes"].tolist() == [3, 0]
    assert int((out["panoptic"] == 1).sum()) == 64
