"""PANet: bottom-up path augmentation after either FPN, adaptive feature pooling, builder options."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign, roi_align
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from segtrain.models.backbones import build_backbone
from segtrain.models.fpn import BackboneFPN
from segtrain.models.maskrcnn import build_maskrcnn
from segtrain.models.pafpn import AdaptiveRoIPool, BottomUpPath, add_bottom_up_path

pytestmark = pytest.mark.usefixtures("no_downloads")

TINY = {"min_size": 64, "max_size": 64, "rpn_pre_nms_top_n_train": 50, "rpn_post_nms_top_n_train": 20,
        "rpn_pre_nms_top_n_test": 50, "rpn_post_nms_top_n_test": 20, "box_batch_size_per_image": 16,
        "representation_size": 64, "mask_head_channels": 16}


def _levels(size: tuple[int, int], channels: int = 8) -> list[torch.Tensor]:
    """P2..P5 of an image of `size`, as a stride-2 network with padding gives them (ceil)."""
    h, w = size
    out = []
    for stride in (4, 8, 16, 32):
        out.append(torch.randn(1, channels, -(-h // stride), -(-w // stride)))
    return out


@pytest.mark.parametrize("size", [(97, 131), (64, 45), (33, 33)])
def test_bottom_up_path_keeps_every_level_shape_and_adds_the_pool_level(size):
    torch.manual_seed(0)
    block = BottomUpPath(8, 4)
    levels = _levels(size)
    outs, names = block(levels, [], ["0", "1", "2", "3"])
    assert names == ["0", "1", "2", "3", "pool"]
    assert [o.shape for o in outs[:4]] == [lvl.shape for lvl in levels]
    assert torch.equal(outs[0], levels[0])  # N2 = P2
    assert torch.equal(outs[4], torch.nn.functional.max_pool2d(outs[3], 1, 2))


def test_bottom_up_path_connects_p2_to_n5():
    torch.manual_seed(0)
    block = BottomUpPath(8, 4).eval()
    levels = _levels((64, 64))
    before, _ = block(levels, [], list("0123"))
    changed = [levels[0] + torch.randn_like(levels[0]), *levels[1:]]
    after, _ = block(changed, [], list("0123"))
    assert not torch.allclose(before[3], after[3])  # a change in P2 reaches N5 (and the pool level)
    assert not torch.allclose(before[4], after[4])
    # ... and through the path only: P3..P5 unchanged, N3 differs.
    assert not torch.allclose(before[1], after[1])


def test_bottom_up_path_matches_mmdetections_pafpn_recurrence():
    torch.manual_seed(0)
    block = BottomUpPath(8, 3)
    p = _levels((64, 64))[:3]
    outs, _ = block(p, [], list("012"))
    inter1 = p[1] + block.downsample[0](p[0])
    inter2 = p[2] + block.downsample[1](inter1)
    assert torch.allclose(outs[1], block.output[0](inter1))
    assert torch.allclose(outs[2], block.output[1](inter2))


def test_both_fpns_take_the_path_in_place_and_keep_their_keys():
    torch.manual_seed(0)
    fpn = FeaturePyramidNetwork([4, 8, 16], 8, extra_blocks=LastLevelMaxPool())
    keys = set(fpn.state_dict())
    add_bottom_up_path(fpn, 8)
    assert keys < set(fpn.state_dict())
    x = OrderedDict((str(i), torch.randn(1, c, 32 // 2**i, 32 // 2**i)) for i, c in enumerate([4, 8, 16]))
    out = fpn(x)
    assert list(out) == ["0", "1", "2", "pool"] and out["pool"].shape[-1] == 4

    body = build_backbone("timm:resnet18")
    neck = BackboneFPN(body, 16)
    add_bottom_up_path(neck.fpn, 16)
    with torch.no_grad():
        out = neck(torch.rand(1, 3, 97, 71))
    assert list(out) == ["0", "1", "2", "3", "pool"]
    assert [tuple(v.shape[-2:]) for v in out.values()] == [(25, 18), (13, 9), (7, 5), (4, 3), (2, 2)]


def test_adaptive_pooling_is_the_max_over_every_levels_roi_align():
    torch.manual_seed(0)
    feats = OrderedDict((str(i), torch.randn(2, 4, 64 // 2**i, 48 // 2**i)) for i in range(4))
    feats["pool"] = torch.randn(2, 4, 4, 3)
    boxes = [torch.tensor([[3.0, 5, 60, 40], [10, 10, 20, 30]]), torch.tensor([[0.0, 0, 190, 250]])]
    shapes = [(256, 192), (256, 192)]
    pool = AdaptiveRoIPool(["0", "1", "2", "3"], 7, 2)
    out = pool(feats, boxes, shapes)
    rois = torch.cat([torch.cat([torch.full((len(b), 1), float(i)), b], 1) for i, b in enumerate(boxes)])
    per_level = torch.stack([roi_align(feats[str(i)], rois, 7, 1 / 4 / 2**i, 2) for i in range(4)])
    assert out.shape == (3, 4, 7, 7)
    assert torch.equal(out, per_level.amax(0))
    plain = MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)(feats, boxes, shapes)
    assert (out >= plain - 1e-6).all() and not torch.allclose(out, plain)


@pytest.mark.parametrize("backbone", ["resnet18", "mobilenet_v3_large"])
def test_builder_options_train_and_predict(backbone):
    torch.manual_seed(0)
    model = build_maskrcnn(4, backbone=backbone, neck="pafpn", adaptive_pooling=True, **TINY)
    assert isinstance(model.backbone.fpn.extra_blocks, BottomUpPath)
    assert isinstance(model.roi_heads.box_roi_pool, AdaptiveRoIPool)
    assert isinstance(model.roi_heads.mask_roi_pool, AdaptiveRoIPool)
    masks = torch.zeros(1, 64, 48, dtype=torch.uint8)
    masks[0, 8:40, 4:30] = 1
    target = {"boxes": torch.tensor([[4.0, 8, 30, 40]]), "labels": torch.tensor([2]), "masks": masks}
    losses = model.train()([torch.rand(3, 64, 48)], [target])
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in model.backbone.fpn.extra_blocks.parameters())
    with torch.no_grad():
        (out,) = model.eval()([torch.rand(3, 45, 61)])
    assert out["masks"].shape[-2:] == (45, 61)


def test_default_neck_keeps_torchvisions_keys_and_bad_neck_is_named():
    with torch.device("meta"):
        plain = build_maskrcnn(5, backbone="resnet18")
        plain_v2 = build_maskrcnn(5, backbone="resnet18", version=2)
        panet = build_maskrcnn(5, backbone="resnet18", neck="pafpn", version=2)
    assert not any("extra_blocks" in k for k in plain.state_dict())
    extra = set(panet.state_dict()) - set(plain_v2.state_dict())
    assert extra and all(k.startswith("backbone.fpn.extra_blocks.") for k in extra)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in panet.backbone.fpn.extra_blocks.modules())
    with pytest.raises(ValueError, match="model.neck='bifpn'.*pafpn"):
        build_maskrcnn(5, backbone="resnet18", neck="bifpn")


def test_anchor_sizes_reach_the_rpn_and_a_wrong_count_is_named():
    with torch.device("meta"):
        model = build_maskrcnn(5, backbone="resnet18", anchor_sizes=[16, 32, 64, 128, 256])
        mobile = build_maskrcnn(5, backbone="mobilenet_v3_large", anchor_sizes=[8, 16, 32, 64, 128])
    assert model.rpn.anchor_generator.sizes == ((16,), (32,), (64,), (128,), (256,))
    assert mobile.rpn.anchor_generator.sizes == ((8, 16, 32, 64, 128),) * 3
    with pytest.raises(ValueError, match="anchor_sizes=.*5 positive sizes"):
        build_maskrcnn(5, backbone="resnet18", anchor_sizes=[16, 32])
