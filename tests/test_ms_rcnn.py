"""Mask Scoring R-CNN: MaskIoU targets, the training step's loss_maskiou, rescored detections."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from segtrain.builders import build_task
from segtrain.models.fpn import BackboneFPN
from segtrain.models.maskrcnn import build_maskrcnn
from segtrain.models.ms_rcnn import (
    MASKIOU_LOSS,
    MaskIoUHead,
    MaskScoringRoIHeads,
    area_ratios,
    mask_iou_targets,
    maskiou_loss,
)
from segtrain.tasks.instance import InstanceTask

pytestmark = pytest.mark.usefixtures("no_downloads")

TINY = {"min_size": 64, "max_size": 64, "rpn_pre_nms_top_n_train": 50, "rpn_post_nms_top_n_train": 20,
        "rpn_pre_nms_top_n_test": 50, "rpn_post_nms_top_n_test": 20, "box_batch_size_per_image": 16,
        "representation_size": 64, "mask_head_channels": 16}


def _tiny(seed: int = 0, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_maskrcnn(4, **{"backbone": "resnet18", "mask_scoring": True, **TINY, **kwargs})


def _targets() -> list[dict[str, torch.Tensor]]:
    masks = torch.zeros(2, 64, 48, dtype=torch.uint8)
    masks[0, 8:30, 4:26] = 1
    masks[1, 36:60, 20:44] = 1
    return [{"boxes": torch.tensor([[4.0, 8, 26, 30], [20, 36, 44, 60]]), "labels": torch.tensor([1, 3]),
             "masks": masks}]


def test_mask_iou_targets_equal_the_iou_with_the_whole_object():
    # The RoI frame is the left 28 columns of a canvas; the object continues 9 columns past it.
    rng = np.random.default_rng(0)
    obj = np.zeros((28, 37), bool)
    obj[5:20, 10:37] = True
    obj[22:26, 2:6] = True
    pred = np.zeros((28, 37), bool)
    pred[3:18, 6:28] = rng.random((15, 22)) > 0.2  # the prediction lives inside the frame
    direct = (pred & obj).sum() / (pred | obj).sum()
    ratio = torch.tensor([obj[:, :28].sum() / obj.sum()])
    logits = torch.where(torch.from_numpy(pred[:, :28]), 3.0, -3.0)[None]
    ours = mask_iou_targets(logits, torch.from_numpy(obj[:, :28]).float()[None], ratio)
    assert ours.item() == pytest.approx(direct, abs=1e-6)
    # All of the object inside: the plain IoU; nothing predicted: 0.
    inside = torch.from_numpy(obj[:, :28]).float()[None]
    full = ((logits > 0) & (inside > 0)).sum() / ((logits > 0) | (inside > 0)).sum()
    assert mask_iou_targets(logits, inside, torch.ones(1)).item() == pytest.approx(full.item(), abs=1e-6)
    assert mask_iou_targets(-logits.abs(), inside, torch.ones(1)).item() == 0.0


def test_area_ratios_are_the_objects_share_inside_each_truncated_box():
    masks = torch.zeros(2, 40, 50, dtype=torch.uint8)
    masks[0, 10:30, 5:45] = 1
    masks[1, 0:8, 0:8] = 1
    boxes = torch.tensor([[5.0, 10, 45, 30], [4.7, 9.2, 25.9, 30.0], [0.0, 0.0, 4.0, 8.0],
                          [60.0, 50, 70, 60]])
    matched = torch.tensor([0, 0, 1, 1])
    expected = []
    for box, g in zip(boxes.numpy().astype(int), matched.tolist()):  # MMDetection's crop
        x0, x1 = np.clip(box[0::2], 0, 50)
        y0, y1 = np.clip(box[1::2], 0, 40)
        crop = masks[g].numpy()[y0:y0 + max(y1 - y0, 1), x0:x0 + max(x1 - x0, 1)]
        expected.append(crop.sum() / masks[g].sum().item())
    assert area_ratios(masks, boxes, matched).tolist() == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx([1.0, 0.5, 0.5, 0.0])


def test_maskiou_loss_is_half_the_mse_of_positive_targets_only():
    pred, target = torch.tensor([0.5, 0.2, 0.9]), torch.tensor([0.7, 0.0, 0.4])
    assert maskiou_loss(pred, target).item() == pytest.approx(0.5 * (0.2**2 + 0.5**2) / 2)
    zero = maskiou_loss(pred.requires_grad_(), torch.zeros(3))
    assert zero.item() == 0.0 and zero.requires_grad


def test_maskiou_head_shapes_follow_mmdetection():
    head = MaskIoUHead(256, 81)
    convs = [m for m in head.convs if isinstance(m, torch.nn.Conv2d)]
    assert [c.in_channels for c in convs] == [257, 256, 256, 256] and convs[-1].stride == (2, 2)
    assert head.fcs[0].in_features == 256 * 7 * 7 and head.fc_mask_iou.out_features == 81
    assert head(torch.rand(3, 256, 14, 14), torch.randn(3, 28, 28)).shape == (3, 81)


def test_training_step_adds_loss_maskiou_and_every_parameter_gets_a_gradient():
    model = _tiny().train()
    assert isinstance(model.roi_heads, MaskScoringRoIHeads)
    torch.manual_seed(1)
    losses = model([torch.rand(3, 64, 48)], _targets())
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_mask", MASKIOU_LOSS,
                           "loss_objectness", "loss_rpn_box_reg"}
    assert all(torch.isfinite(v) for v in losses.values()) and losses[MASKIOU_LOSS] > 0
    sum(losses.values()).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
    assert model.roi_heads.maskiou_head.fc_mask_iou.weight.grad.abs().sum() > 0


def test_mask_loss_is_torchvisions_and_keys_only_add_the_maskiou_head():
    plain, scoring = _tiny(mask_scoring=False).train(), _tiny().train()
    extra = set(scoring.state_dict()) - set(plain.state_dict())
    assert extra and all(k.startswith("roi_heads.maskiou_head.") for k in extra)
    assert set(plain.state_dict()) <= set(scoring.state_dict())
    out = []
    for model in (plain, scoring):
        torch.manual_seed(1)
        out.append(model([torch.rand(3, 64, 48)], _targets()))
    for name in out[0]:
        assert torch.allclose(out[0][name], out[1][name]), name


def test_eval_scores_are_class_score_times_predicted_iou():
    model = _tiny(box_score_thresh=0.0).eval()
    heads, seen = model.roi_heads, {}
    post = heads.postprocess_detections

    def capture(*args):
        seen["boxes"], seen["scores"], seen["labels"] = out = post(*args)
        return out

    heads.postprocess_detections = capture
    heads.maskiou_head.register_forward_hook(lambda m, i, o: seen.__setitem__("iou", o))
    torch.manual_seed(2)
    with torch.no_grad():
        (output,) = model([torch.rand(3, 64, 48)])
    scores, labels = seen["scores"][0], seen["labels"][0]
    assert len(scores) > 1
    iou = seen["iou"][torch.arange(len(labels)), labels].clamp(0, 1)
    expected, order = (scores * iou).sort(descending=True)
    assert torch.allclose(output["scores"], expected)
    assert torch.equal(output["labels"], labels[order])
    assert torch.equal(output["boxes"], seen["boxes"][0][order])
    assert output["masks"].shape == (len(scores), 1, 64, 48)


def test_coco_mask_rcnn_weights_start_ms_rcnn_with_a_fresh_maskiou_head(tmp_path):
    plain = _tiny(mask_scoring=False)
    torch.save(plain.state_dict(), tmp_path / "maskrcnn.pth")
    model = _tiny(seed=3, weights=str(tmp_path / "maskrcnn.pth"))
    own = model.state_dict()  # pretrained: FrozenBatchNorm2d, no num_batches_tracked
    for key, value in plain.state_dict().items():
        assert key.endswith("num_batches_tracked") or torch.equal(own[key], value), key


def test_ms_rcnn_config_on_a_timm_backbone_with_panet_trains_and_predicts(compose_cfg):
    cfg = compose_cfg("train", ["model=ms_rcnn", "model.backbone=timm:resnet18", "model.neck=pafpn",
                                "model.adaptive_pooling=true", "dataset=synthetic_instance",
                                "dataset.train.num_samples=2", "dataset.train.image_size=64",
                                *(f"model.{k}={v}" for k, v in TINY.items())])
    train = instantiate(cfg.dataset.train)
    task = build_task(cfg, train.meta)
    assert isinstance(task, InstanceTask) and task.loss_weights[MASKIOU_LOSS] == 1.0
    torch.manual_seed(0)
    model = instantiate(cfg.model).train()
    assert isinstance(model.backbone, BackboneFPN) and isinstance(model.roi_heads, MaskScoringRoIHeads)
    losses = task.training_step(model, task.collate([train[0], train[1]]))
    assert MASKIOU_LOSS in losses and all(torch.isfinite(v) for v in losses.values())
    losses["loss"].backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.eval()
    with torch.no_grad():
        (output,) = model([torch.rand(3, 97, 71)])
    assert output["masks"].shape[-2:] == (97, 71)
