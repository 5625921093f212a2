"""The backbone layer: documented channels and strides per family, dilation, freezing, weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.models import get_model
from torchvision.ops.misc import FrozenBatchNorm2d

from segtrain.models.backbones import build_backbone
from segtrain.optim.param_groups import build_param_groups

# Channels of the stride 4/8/16/32 stage outputs as the papers and torchvision/timm document them.
DOCUMENTED = {
    "resnet18": [64, 128, 256, 512],
    "resnet50": [256, 512, 1024, 2048],
    "resnext50_32x4d": [256, 512, 1024, 2048],
    "wide_resnet50_2": [256, 512, 1024, 2048],
    "regnet_y_400mf": [48, 104, 208, 440],
    "convnext_tiny": [96, 192, 384, 768],
    "swin_t": [96, 192, 384, 768],
    "swin_v2_t": [96, 192, 384, 768],
    "efficientnet_b0": [24, 40, 112, 320],
    "efficientnet_v2_s": [48, 64, 160, 256],
    "mobilenet_v3_large": [24, 40, 112, 960],  # torchvision's DeepLabV3/LR-ASPP read the 960-ch conv
    "timm:resnet18": [64, 128, 256, 512],
    "timm:convnext_atto": [40, 80, 160, 320],
}
ODD = (97, 131)


def _sizes(stride: int) -> set[tuple[int, int]]:
    """What a stride-s map of a 97x131 image may measure: floor or ceil per side."""
    return {(h, w) for h in (ODD[0] // stride, -(-ODD[0] // stride))
            for w in (ODD[1] // stride, -(-ODD[1] // stride))}


@pytest.mark.parametrize("name", DOCUMENTED)
def test_channels_and_strides_are_the_documented_ones(name):
    torch.manual_seed(0)
    backbone = build_backbone(name).eval()
    assert backbone.channels == DOCUMENTED[name] and backbone.strides == [4, 8, 16, 32]
    with torch.no_grad():
        features = backbone(torch.randn(1, 3, *ODD))
    assert [f.shape[1] for f in features] == DOCUMENTED[name]
    for f, stride in zip(features, backbone.strides):
        assert tuple(f.shape[-2:]) in _sizes(stride), (name, stride, f.shape)
        assert torch.isfinite(f).all()


@pytest.mark.parametrize(("output_stride", "strides"), [(8, [4, 8, 8, 8]), (16, [4, 8, 16, 16])])
def test_resnet_dilation_sets_the_output_stride(output_stride, strides):
    backbone = build_backbone("resnet50", output_stride=output_stride).eval()
    assert backbone.strides == strides
    with torch.no_grad():
        features = backbone(torch.randn(1, 3, *ODD))
    for f, stride in zip(features, strides):
        assert tuple(f.shape[-2:]) in _sizes(stride)


@pytest.mark.parametrize(("name", "fragment"),
                         [("resnet18", "BasicBlock"), ("convnext_tiny", "ResNet-family")])
def test_dilation_where_impossible_is_refused(name, fragment):
    with pytest.raises(ValueError, match=fragment):
        build_backbone(name, output_stride=8)


def test_out_indices_select_levels_and_bad_ones_are_named():
    backbone = build_backbone("resnet18", out_indices=[1, 3])
    assert backbone.channels == [128, 512] and backbone.strides == [8, 32]
    assert len(backbone(torch.randn(1, 3, 64, 64))) == 2
    with pytest.raises(ValueError, match="out_indices"):
        build_backbone("resnet18", out_indices=[3, 1])
    with pytest.raises(ValueError, match="not a torchvision backbone"):
        build_backbone("vgg16")


@pytest.mark.parametrize("name", ["resnet18", "convnext_tiny", "timm:resnet18"])
def test_frozen_stages_stop_gradients_and_statistics(name):
    backbone = build_backbone(name, frozen_stages=1).train()
    frozen = [n for n, p in backbone.named_parameters() if not p.requires_grad]
    trained = [n for n, p in backbone.named_parameters() if p.requires_grad]
    assert frozen and trained
    stats = {n: b.clone() for n, b in backbone.named_buffers() if "running_mean" in n}
    sum(f.mean() for f in backbone(torch.randn(2, 3, 64, 64))).backward()
    for n, p in backbone.named_parameters():
        assert (p.grad is None) == (not p.requires_grad), n
    moved = {n for n, b in backbone.named_buffers() if n in stats and not torch.equal(b, stats[n])}
    frozen_modules = {n.rsplit(".", 1)[0] for n in frozen}
    assert not any(n.rsplit(".", 1)[0] in frozen_modules for n in moved), "a frozen BatchNorm moved"
    if name != "convnext_tiny":  # LayerNorm only: nothing to move
        assert moved, "trained BatchNorms update their statistics"
    with pytest.raises(ValueError, match="frozen_stages"):
        build_backbone(name, frozen_stages=7)


def test_frozen_bn_uses_the_loaded_statistics():
    torch.manual_seed(0)
    plain = build_backbone("resnet18")
    for m in plain.modules():  # statistics that are not the identity
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 2.0)
    frozen = build_backbone("resnet18", frozen_bn=True)
    frozen.load_state_dict({k: v for k, v in plain.state_dict().items() if "num_batches" not in k})
    assert not any(isinstance(m, nn.BatchNorm2d) for m in frozen.modules())
    assert any(isinstance(m, FrozenBatchNorm2d) for m in frozen.modules())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = plain.eval()(x)
        got = frozen.train()(x)  # train mode: still the stored statistics
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_imagenet_weights_load_from_a_local_file_and_the_classifier_is_dropped(tmp_path):
    torch.manual_seed(1)
    classifier = get_model("resnet18", weights=None)
    path = tmp_path / "resnet18_imagenet.pth"
    torch.save(classifier.state_dict(), path)
    backbone = build_backbone("resnet18", weights=str(path))
    for key, value in backbone.body.state_dict().items():
        assert torch.equal(value, classifier.state_dict()[key]), key
    with pytest.raises(FileNotFoundError, match="no_such.pth"):
        build_backbone("resnet18", weights=str(tmp_path / "no_such.pth"))
    with pytest.raises(ValueError, match="do not fit"):  # another architecture's file
        build_backbone("resnet50", weights=str(path))


def test_torchvision_weights_name_missing_from_the_cache_names_the_file(hub_cache):
    with pytest.raises(FileNotFoundError, match=str(hub_cache)):
        build_backbone("convnext_tiny", weights="ConvNeXt_Tiny_Weights.IMAGENET1K_V1")


def test_timm_weights_load_from_a_safetensors_file_and_the_cache_never_downloads(tmp_path, monkeypatch):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(2)
    source = timm.create_model("resnet18", pretrained=False)
    path = tmp_path / "resnet18.safetensors"
    save_file(source.state_dict(), str(path))
    backbone = build_backbone("timm:resnet18", weights=str(path))
    key = "layer4.1.conv2.weight"
    assert torch.equal(backbone.body.state_dict()[key], source.state_dict()[key])
    monkeypatch.setattr("huggingface_hub.try_to_load_from_cache", lambda *a, **k: None)
    with pytest.raises(FileNotFoundError, match="Hugging Face cache"):
        build_backbone("timm:resnet18", weights="cache")
    with pytest.raises(ValueError, match="timm has no such model"):
        build_backbone("timm:resnet_does_not_exist")


def test_swin_position_tables_and_norms_get_no_weight_decay():
    model = nn.Module()
    model.backbone = build_backbone("swin_t")
    groups = build_param_groups(model, lr=1e-4, weight_decay=0.05)
    tables = {id(p) for n, p in model.named_parameters() if "relative_position_bias_table" in n}
    assert tables
    for group in groups:
        if any(id(p) in tables for p in group["params"]):
            assert group["weight_decay"] == 0.0


def test_bf16_autocast_on_cpu_matches_fp32():
    torch.manual_seed(0)
    backbone = build_backbone("convnext_tiny").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = backbone(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = backbone(x.contiguous(memory_format=torch.channels_last))
    for a, b in zip(low, ref):
        assert torch.isfinite(a).all()
        assert (a.float() - b).abs().mean() < 0.05 * b.abs().mean()


@pytest.mark.parametrize("name", ["swin_t", "convnext_tiny"])
def test_drop_path_rate_grows_linearly_to_the_given_rate(name):
    from torchvision.ops import StochasticDepth

    backbone = build_backbone(name, drop_path_rate=0.3)
    rates = [m.p for m in backbone.modules() if isinstance(m, StochasticDepth)]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.3)
    assert rates == sorted(rates)
    with pytest.raises(ValueError, match="no stochastic depth"):
        build_backbone("resnet18", drop_path_rate=0.1)
