"""Encoder-decoder models (FCN, DeepLabV3+, PSPNet, UPerNet, SegFormer, Res-U-Net) and the MiT
encoders: output contract at odd sizes, gradients, sizes against the published models, weights."""

from __future__ import annotations

import pytest
import torch

from segtrain.models.backbones import build_backbone
from segtrain.models.encoder_decoder import (
    build_deeplabv3plus,
    build_fcn,
    build_pspnet,
    build_segformer,
    build_upernet,
)
from segtrain.models.heads import aspp_dilations
from segtrain.models.unet import UNet, build_unet

pytestmark = pytest.mark.usefixtures("no_downloads")  # any weight download fails the test

# Small backbones keep each case well under a second on CPU; the heads keep their paper widths.
TINY = {
    "fcn": (build_fcn, {"backbone": "resnet18", "output_stride": 32}),
    "deeplabv3plus": (build_deeplabv3plus, {"backbone": "resnet18", "output_stride": 32}),
    "pspnet": (build_pspnet, {"backbone": "resnet18", "output_stride": 32}),
    "upernet": (build_upernet, {"backbone": "resnet18"}),
    "segformer": (build_segformer, {"drop_path_rate": 0.0}),  # no randomly skipped blocks
    "unet": (build_unet, {"backbone": "resnet18"}),
}

# Published sizes, in parameters.
# SegFormer paper (Xie et al., NeurIPS 2021), Table 1a (ADE20K, 150 classes): encoder / decoder
# 3.4M / 0.4M with MiT-B0, 24.2M / 3.3M with MiT-B2; Table 2: whole model 3.8M (B0), 27.5M (B2).
SEGFORMER = {"mit_b0": (3.4e6, 0.4e6, 3.8e6), "mit_b2": (24.2e6, 3.3e6, 27.5e6)}
ROUNDING = 0.05e6  # the paper rounds to 0.1M
# Swin paper (Liu et al., ICCV 2021), Table 3: UperNet with Swin-T, 60M on ADE20K (150 classes).
# The number comes from mmseg's get_flops, which counts the auxiliary FCN head too.
UPERNET_SWIN_T = 60e6
TOLERANCE = 0.03


def _tiny(name: str, num_classes: int = 5, **overrides) -> torch.nn.Module:
    build, kwargs = TINY[name]
    torch.manual_seed(0)
    return build(num_classes, **{**kwargs, **overrides})


def _count(module: torch.nn.Module, prefix: str = "") -> int:
    return sum(p.numel() for name, p in module.named_parameters() if name.startswith(prefix))


# ---------------------------------------------------------------------------- output contract
@pytest.mark.parametrize("name", sorted(TINY))
@pytest.mark.parametrize("aux", [True, False])
def test_logits_have_the_input_size_and_gradients_reach_every_parameter(name, aux):
    model = _tiny(name, aux_head=aux).train()
    x = torch.randn(2, 3, 97, 131)  # odd: feature maps are not exact multiples of each other
    out = model(x)
    assert set(out) == ({"out", "aux"} if aux else {"out"})
    assert all(logits.shape == (2, 5, 97, 131) for logits in out.values())
    target = torch.randint(0, 5, (2, 97, 131))
    sum(torch.nn.functional.cross_entropy(v, target) for v in out.values()).backward()
    dead = [n for n, p in model.named_parameters()
            if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert dead == []


def test_backbone_parameters_are_under_backbone_and_the_heads_outside():
    model = _tiny("upernet")
    prefixes = {name.split(".")[0] for name, _ in model.named_parameters()}
    assert prefixes == {"backbone", "decode_head", "aux_head"}


def test_deeplabv3plus_dilations_follow_the_output_stride():
    assert aspp_dilations(8) == (12, 24, 36) and aspp_dilations(16) == (6, 12, 18)
    model = build_deeplabv3plus(3, backbone="resnet50", output_stride=16, aux_head=False)
    assert model.backbone.strides == [4, 8, 16, 16]
    depthwise = [branch[0][0] for branch in model.decode_head.aspp[1:]]
    assert [conv.dilation for conv in depthwise] == [(6, 6), (12, 12), (18, 18)]
    out = model.eval()(torch.randn(1, 3, 65, 47))["out"]
    assert out.shape == (1, 3, 65, 47)


# ------------------------------------------------------------------------------- MiT encoders
def test_mit_b0_levels_and_sizes():
    backbone = build_backbone("mit_b0").eval()
    assert backbone.channels == [32, 64, 160, 256] and backbone.strides == [4, 8, 16, 32]
    with torch.no_grad():
        features = backbone(torch.randn(1, 3, 97, 131))
    assert [tuple(f.shape[1:]) for f in features] == [(32, 25, 33), (64, 13, 17), (160, 7, 9),
                                                      (256, 4, 5)]


def test_mit_frozen_stages_freeze_the_stem_then_whole_stages():
    backbone = build_backbone("mit_b0", frozen_stages=1)
    trainable = {name.split(".")[0] for name, p in backbone.named_parameters() if p.requires_grad}
    assert trainable == {"patch_embed2", "patch_embed3", "patch_embed4", "block2", "block3",
                         "block4", "norm2", "norm3", "norm4"}


@pytest.mark.parametrize(("kwargs", "fragment"), [
    ({"output_stride": 16}, "model.output_stride=16"),
    ({"frozen_bn": True}, "model.frozen_bn"),
    ({"drop_path_rate": 1.5}, "model.drop_path_rate=1.5"),
])
def test_mit_rejects_options_it_cannot_honour(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        build_backbone("mit_b0", **kwargs)


def test_mit_loads_an_official_file_ignoring_its_classifier(tmp_path):
    torch.manual_seed(0)
    source = build_backbone("mit_b0")
    state = {**source.state_dict(), "head.weight": torch.zeros(1000, 256)}
    torch.save(state, tmp_path / "mit_b0.pth")
    torch.manual_seed(1)
    loaded = build_backbone("mit_b0", weights=str(tmp_path / "mit_b0.pth"))
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in loaded.state_dict().items())


# ----------------------------------------------------------------------- published model sizes
@pytest.mark.parametrize("backbone", sorted(SEGFORMER))
def test_segformer_sizes_match_the_paper(backbone):
    encoder, decoder, total = SEGFORMER[backbone]
    model = build_segformer(150, backbone=backbone)
    assert _count(model) == pytest.approx(total, abs=ROUNDING)
    assert _count(model, "backbone.") == pytest.approx(encoder, rel=TOLERANCE)
    assert _count(model, "decode_head.") == pytest.approx(decoder, abs=ROUNDING)


def test_upernet_swin_t_size_matches_the_swin_paper():
    model = build_upernet(150, backbone="swin_t")
    assert _count(model) == pytest.approx(UPERNET_SWIN_T, rel=TOLERANCE)  # aux head counted


# ------------------------------------------------------------------------------------ weights
def _outputs(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    with torch.no_grad():
        return model.eval()(torch.randn(2, 3, 64, 64))


@pytest.mark.parametrize("name", ["pspnet", "segformer"])
def test_weights_round_trip_and_another_class_count_reinitialises_only_classifiers(name, tmp_path):
    source = _tiny(name, aux_head=True)
    path = tmp_path / "model.pt"
    torch.save({"model": source.state_dict(), "step": torch.tensor(3)}, path)  # a checkpoint
    torch.manual_seed(1)
    same = TINY[name][0](5, **TINY[name][1], aux_head=True, weights=str(path))
    for key, value in _outputs(same).items():
        torch.testing.assert_close(value, _outputs(source)[key], rtol=0, atol=0)

    other = TINY[name][0](2, **TINY[name][1], aux_head=True, weights=str(path))
    file_state = source.state_dict()
    differing = sorted(k for k, v in other.state_dict().items()
                       if v.shape != file_state[k].shape or not torch.equal(v, file_state[k]))
    assert differing == ["aux_head.classifier.bias", "aux_head.classifier.weight",
                         "decode_head.classifier.bias", "decode_head.classifier.weight"]


def test_weights_of_another_architecture_are_refused(tmp_path):
    torch.save(_tiny("pspnet").state_dict(), tmp_path / "psp.pt")
    with pytest.raises(ValueError, match="psp.pt"):
        _tiny("upernet", weights=str(tmp_path / "psp.pt"))


# ------------------------------------------------------------------------------------- U-Net
def test_unet_builder_without_backbone_is_the_small_unet():
    torch.manual_seed(0)
    built = build_unet(5)
    torch.manual_seed(0)
    reference = UNet(5)
    assert type(built) is UNet
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in built.state_dict().items())


@pytest.mark.parametrize(("kwargs", "fragment"), [
    ({"weights_backbone": "x.pth"}, "model.weights_backbone only applies with a backbone"),
    ({"backbone": "resnet18", "in_channels": 4}, "model.in_channels=4"),
    ({"backbone": "resnet18", "decoder_channels": [64, 32]}, r"decoder_channels=\[64, 32\]; expected 5"),
])
def test_unet_builder_rejects_keys_the_variant_would_ignore(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        build_unet(3, **kwargs)


def test_unet_with_a_backbone_ignores_the_small_unets_keys_with_a_warning(caplog):
    # conf/tuned/ sets base_channels=16 for the default composition: model.backbone=... must work.
    model = build_unet(3, backbone="resnet18", base_channels=16, aux_head=True)
    assert "ignoring the small U-Net's model.base_channels=16" in caplog.text
    assert model(torch.randn(1, 3, 33, 47))["out"].shape == (1, 3, 33, 47)


@pytest.mark.parametrize(("build", "kwargs", "fragment"), [
    (build_pspnet, {"num_classes": 0}, "model.num_classes=0"),
    (build_upernet, {"num_classes": 3, "channels": 0}, "model.channels=0"),
    (build_fcn, {"num_classes": 3, "backbone": "resnet18", "output_stride": 32,
                 "out_indices": [3]},
     "model.aux_head=true needs two feature levels"),
])
def test_builders_reject_invalid_options_naming_the_key(build, kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        build(**kwargs)
