"""Mask R-CNN and Panoptic FPN on any backbone (Swin, ConvNeXt, timm, ...) through BackboneFPN,
while torchvision's own FPN backbones keep torchvision's state-dict keys."""

from __future__ import annotations

import pytest
import torch
import torchvision
from hydra.utils import instantiate
from torchvision.models.detection import maskrcnn_resnet50_fpn
from torchvision.ops import FrozenBatchNorm2d

from segtrain.builders import build_task
from segtrain.models.fpn import BackboneFPN
from segtrain.models.maskrcnn import build_maskrcnn
from segtrain.models.panoptic_fpn import build_panoptic_fpn

pytestmark = pytest.mark.usefixtures("no_downloads")

DATASETS = {"maskrcnn": "synthetic_instance", "panoptic_fpn": "synthetic_panoptic"}
# 64-pixel inputs, few proposals and narrow heads: a step takes about a second on a CPU.
SMALL = ["model.min_size=64", "model.max_size=64", "model.rpn_pre_nms_top_n_train=50",
         "model.rpn_post_nms_top_n_train=20", "model.rpn_pre_nms_top_n_test=50",
         "model.rpn_post_nms_top_n_test=20", "model.box_batch_size_per_image=16",
         "model.representation_size=64", "model.mask_head_channels=16",
         "dataset.train.num_samples=2", "dataset.train.image_size=64"]
ODD_SIZES = [(97, 131), (64, 45)]  # not multiples of 32: the transform pads them for Swin


def _compose(compose_cfg, model: str, backbone: str):
    return compose_cfg("train", [f"model={model}", f"model.backbone={backbone}",
                                 f"dataset={DATASETS[model]}", *SMALL])


@pytest.mark.parametrize(("model_name", "backbone"), [
    ("maskrcnn", "swin_t"), ("maskrcnn", "convnext_tiny"), ("maskrcnn", "timm:resnet18"),
    ("panoptic_fpn", "convnext_tiny"),
])
def test_any_backbone_trains_with_finite_losses_and_predicts_at_the_input_size(compose_cfg, model_name,
                                                                               backbone):
    cfg = _compose(compose_cfg, model_name, backbone)
    train = instantiate(cfg.dataset.train)
    task = build_task(cfg, train.meta)
    torch.manual_seed(0)
    model = instantiate(cfg.model).train()
    assert isinstance(model.backbone, BackboneFPN) and model.backbone.out_channels == 256
    names = [name for name, _ in model.named_parameters()]
    assert all(name.startswith("backbone.") for name in names if ".body." in name or ".fpn." in name)
    assert any(name.startswith("backbone.body.") for name in names)  # the backbone-lr prefix finds it

    losses = task.training_step(model, task.collate([train[0], train[1]]))
    assert all(torch.isfinite(value) for value in losses.values()), losses
    losses["loss"].backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and torch.isfinite(param.grad).all(), name
    body = model.backbone.body.parameters()
    assert any(float(p.grad.abs().sum()) > 0 for p in body if p.requires_grad)

    model.eval()
    assert model.transform.size_divisible == 32
    with torch.no_grad():
        outputs = model([torch.rand(3, *size) for size in ODD_SIZES])
    for output, size in zip(outputs, ODD_SIZES):  # torchvision's detection format
        n = len(output["scores"])
        assert output["boxes"].shape == (n, 4) and output["labels"].shape == (n,)
        assert output["masks"].shape == (n, 1, *size)
        if model_name == "panoptic_fpn":
            assert output["sem_seg"].shape == (cfg.model.num_stuff + 1, *size)


def test_torchvision_backbones_keep_torchvisions_state_dict_keys():
    with torch.device("meta"):
        ours = build_maskrcnn(91, backbone="resnet50").state_dict()
        theirs = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None).state_dict()
    assert list(ours) == list(theirs)
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


def test_trainable_layers_freeze_stages_and_batch_norm_of_a_pretrained_backbone(tmp_path):
    torch.manual_seed(0)
    classifier = torchvision.models.regnet_y_400mf()
    torch.save(classifier.state_dict(), tmp_path / "regnet.pth")
    model = build_maskrcnn(6, backbone="regnet_y_400mf", weights_backbone=str(tmp_path / "regnet.pth"),
                           trainable_layers=2, min_size=64, max_size=64)
    body = model.backbone.body.body
    # trainable_layers=2: the last two stages train; the stem and stages 1, 2 are frozen.
    assert not any(p.requires_grad for p in body.stem.parameters())
    assert not any(p.requires_grad for p in body.trunk_output.block2.parameters())
    assert all(p.requires_grad for p in body.trunk_output.block3.parameters())
    assert all(p.requires_grad for p in model.backbone.fpn.parameters())
    # version 1 from pretrained weights: torchvision's frozen BatchNorm, holding the file's statistics
    assert any(isinstance(m, FrozenBatchNorm2d) for m in body.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in body.modules())
    assert torch.equal(body.stem[0].weight, classifier.stem[0].weight)


def test_fpn_is_batch_normalised_in_version_2_only():
    def norms(version: int) -> int:
        with torch.device("meta"):
            fpn = build_maskrcnn(6, backbone="convnext_tiny", version=version).backbone.fpn
        return sum(isinstance(m, torch.nn.BatchNorm2d) for m in fpn.modules())

    assert norms(1) == 0 and norms(2) == 8  # 4 lateral + 4 output convolutions


def test_drop_path_rate_reaches_the_backbone_and_is_refused_where_there_is_none():
    with torch.device("meta"):
        model = build_maskrcnn(6, backbone="convnext_tiny", drop_path_rate=0.3)  # torchvision: 0.1
    rates = [m.p for m in model.backbone.body.modules() if type(m).__name__ == "StochasticDepth"]
    assert max(rates) == pytest.approx(0.3)
    with pytest.raises(ValueError, match=r"model.drop_path_rate=0.1: backbone resnet50"):
        build_maskrcnn(6, backbone="resnet50", drop_path_rate=0.1)


def test_unknown_backbones_and_three_level_fpns_are_refused_by_name():
    with pytest.raises(ValueError, match=r"model.backbone='vgg16'.*convnext_tiny.*timm:NAME"):
        build_maskrcnn(6, backbone="vgg16")
    with pytest.raises(ValueError, match="mobilenet_v3_large.*P2..P5"):
        build_panoptic_fpn(num_things=2, num_stuff=2, backbone="mobilenet_v3_large")
