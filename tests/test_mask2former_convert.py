"""Official Mask2Former checkpoints -> segtrain (segtrain.models.mask2former.convert).

The official layout is written here independently of convert.py: detectron2's ResNet names from
detectron2's own naming rules, and Swin from timm's Swin (the official Swin's names and tensor
layout, its patch merging one stage later), whose features the converted backbone must match.
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from segtrain.models.mask2former.convert import BACKGROUND_LOGIT, convert_official, is_official, main
from segtrain.models.mask2former.model import build_mask2former, load_mask2former_weights
from segtrain.models.weights import load_matching

SMALL = dict(hidden_dim=64, num_queries=6, nheads=4, dim_feedforward=64, dec_layers=3, enc_layers=1,
             enc_dim_feedforward=64, mask_dim=64)
BN = ("weight", "bias", "running_mean", "running_var")  # detectron2's FrozenBN: no num_batches_tracked


def randomize(state_dict: dict[str, torch.Tensor], seed: int) -> None:
    """Every float tensor redrawn (norm weights too, so swapped norms change the outputs)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in state_dict.items():
            if not t.is_floating_point():
                continue
            noise = torch.randn(t.shape, generator=gen)
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
            elif t.dim() >= 2:
                t.copy_(noise / t[0].numel() ** 0.5)
            else:
                t.copy_(noise * 0.1 + (1.0 if name.endswith("weight") else 0.0))


def official_resnet50() -> dict[str, str]:
    """detectron2 ResNet-50 name -> torchvision ResNet-50 name, from detectron2's rules."""
    names = {"backbone.stem.conv1.weight": "conv1.weight"}
    names.update({f"backbone.stem.conv1.norm.{s}": f"bn1.{s}" for s in BN})
    for stage, blocks in zip(range(2, 6), (3, 4, 6, 3)):
        for k in range(blocks):
            d2, tv = f"backbone.res{stage}.{k}", f"layer{stage - 1}.{k}"
            for c in (1, 2, 3):
                names[f"{d2}.conv{c}.weight"] = f"{tv}.conv{c}.weight"
                names.update({f"{d2}.conv{c}.norm.{s}": f"{tv}.bn{c}.{s}" for s in BN})
            if k == 0:
                names[f"{d2}.shortcut.weight"] = f"{tv}.downsample.0.weight"
                names.update({f"{d2}.shortcut.norm.{s}": f"{tv}.downsample.1.{s}" for s in BN})
    return names


def official_r50_checkpoint(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`model`'s tensors in the official layout (sem_seg_head.*, detectron2 backbone, the loss buffer)."""
    own = model.state_dict()
    official = {d2: own[f"backbone.body.{tv}"] for d2, tv in official_resnet50().items()}
    official.update({f"sem_seg_head.{k}": v for k, v in own.items() if not k.startswith("backbone.")})
    official["criterion.empty_weight"] = torch.ones(9)
    return official


def predict(model: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return model.eval()(x)


@pytest.fixture(scope="module")
def r50() -> tuple[torch.nn.Module, dict[str, torch.Tensor], torch.Tensor, dict[str, torch.Tensor]]:
    """A random R50 model, its official checkpoint, an input batch and the model's outputs."""
    torch.manual_seed(0)
    model = build_mask2former(8, backbone="resnet50", **SMALL).eval()
    randomize(model.state_dict(), seed=1)
    x = torch.randn(2, 3, 64, 96)
    return model, official_r50_checkpoint(model), x, predict(model, x)


def test_r50_official_names_are_detectron2s(r50):
    model, official, _, _ = r50
    assert len([k for k in official if k.startswith("backbone.")]) == 265  # 53 convs, 53 FrozenBNs
    converted = convert_official(official)
    own = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert set(converted) == set(own)
    assert all(torch.equal(converted[k], own[k]) for k in own)
    assert is_official(official) and not is_official(model.state_dict())


def test_r50_file_loads_and_predicts_as_the_source(r50, tmp_path):
    _, official, x, expected = r50
    path = tmp_path / "m2f_r50.pth"
    torch.save({"model": official}, path)  # what the docstring's snippet writes, under "model"
    torch.manual_seed(5)
    loaded = build_mask2former(8, backbone="resnet50", weights=str(path), **SMALL)
    got = predict(loaded, x)
    for key in ("pred_logits", "pred_masks"):
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-6)


def test_r50_loads_into_frozen_batch_norm(r50):
    _, official, _, _ = r50
    frozen = build_mask2former(8, backbone="resnet50", frozen_bn=True, **SMALL)
    load_matching(frozen, convert_official(official))
    assert torch.equal(frozen.backbone.body.layer4[2].bn3.running_var,
                       official["backbone.res5.2.conv3.norm.running_var"])


def test_insert_background_shifts_classes_and_never_wins(r50):
    _, official, x, expected = r50
    converted = convert_official(official, insert_background=True)
    assert converted["predictor.class_embed.weight"].shape == (10, 64)
    shifted = build_mask2former(9, backbone="resnet50", **SMALL)
    load_matching(shifted, converted)  # strict: a wrong class count fails, is not re-initialised
    got = predict(shifted, x)["pred_logits"]
    torch.testing.assert_close(got[..., 1:], expected["pred_logits"], rtol=1e-6, atol=1e-5)
    assert torch.all(got[..., 0] == BACKGROUND_LOGIT)
    assert not (got.argmax(-1) == 0).any()
    assert convert_official(official)["predictor.class_embed.weight"].shape == (9, 64)


def test_command_line_writes_a_segtrain_file(r50, tmp_path):
    _, official, _, _ = r50
    torch.save(official, tmp_path / "official.pth")
    main([str(tmp_path / "official.pth"), str(tmp_path / "ours.pth"), "--insert-background"])
    ours = torch.load(tmp_path / "ours.pth", weights_only=True)
    assert not is_official(ours) and ours["predictor.class_embed.bias"][0] == BACKGROUND_LOGIT
    assert torch.equal(ours["backbone.body.layer1.0.downsample.1.running_mean"],
                       official["backbone.res2.0.shortcut.norm.running_mean"])
    with pytest.raises(SystemExit):
        main([str(tmp_path / "ours.pth"), str(tmp_path / "again.pth")])
    before = (tmp_path / "ours.pth").read_bytes()
    with pytest.raises(SystemExit):  # an existing target is never overwritten
        main([str(tmp_path / "official.pth"), str(tmp_path / "ours.pth")])
    assert (tmp_path / "ours.pth").read_bytes() == before


@pytest.mark.parametrize("extra", ["backbone.fpn_lateral2.weight", "backbone.absolute_pos_embed",
                                   "backbone.res6.0.conv1.weight", "model.pixel_mean"])
def test_unmapped_keys_raise_naming_them(r50, extra):
    _, official, _, _ = r50
    with pytest.raises(ValueError, match=re.escape(extra)):
        convert_official({**official, extra: torch.zeros(1)})


def test_a_mistyped_head_key_fails_to_load(r50, tmp_path):
    model, official, _, _ = r50
    renamed = {k.replace("decoder_norm", "decoder_nrm"): v for k, v in official.items()}
    path = tmp_path / "bad.pth"
    torch.save(renamed, path)
    with pytest.raises(ValueError, match="decoder_nrm"):
        load_mask2former_weights(model, str(path))


def official_swin_from_timm(timm_model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """The official Swin-Det backbone keys: timm's, its downsample moved to the end of the previous
    stage, the final norm replaced by one LayerNorm per output (norm0..norm3)."""
    official = {}
    for key, value in timm_model.state_dict().items():
        if key.startswith(("norm.", "head.")):
            continue
        m = re.fullmatch(r"layers\.(\d+)\.downsample\.(.+)", key)
        official["backbone." + (f"layers.{int(m[1]) - 1}.downsample.{m[2]}" if m else key)] = value
    for key, value in timm_model.named_buffers():
        if key.endswith("relative_position_index"):  # persistent in the official Swin, not in timm's
            assert value.shape == (49, 49)
            official["backbone." + key] = value
    gen = torch.Generator().manual_seed(seed)
    for i, dim in enumerate((96, 192, 384, 768)):
        official[f"backbone.norm{i}.weight"] = 1 + 0.1 * torch.randn(dim, generator=gen)
        official[f"backbone.norm{i}.bias"] = 0.1 * torch.randn(dim, generator=gen)
    return official


def test_swin_t_features_match_the_official_layout():
    timm = pytest.importorskip("timm")
    # 448: every stage a multiple of the window and wider than it. Elsewhere the three differ (timm
    # rolls before padding, torchvision skips the shift on a one-window map), not their names.
    reference = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=448,
                                  num_classes=0).eval()
    randomize(reference.state_dict(), seed=2)
    official = official_swin_from_timm(reference, seed=3)
    torch.manual_seed(0)
    source = build_mask2former(8, backbone="swin_t", **SMALL)
    randomize(source.state_dict(), seed=4)
    official.update({f"sem_seg_head.{k}": v for k, v in source.state_dict().items()
                     if not k.startswith("backbone.")})
    model = build_mask2former(8, backbone="swin_t", **SMALL).eval()
    own_index = model.backbone.body.features[7][1].attn.relative_position_index.clone()
    converted = convert_official(official)
    load_matching(model, converted)
    assert torch.equal(model.backbone.body.features[7][1].attn.relative_position_index, own_index)
    for key, value in source.state_dict().items():
        if not key.startswith("backbone."):
            assert torch.equal(model.state_dict()[key], value), key

    x = torch.randn(1, 3, 448, 448)
    with torch.no_grad():
        got = model.backbone(x)
        stages = reference.forward_intermediates(x, intermediates_only=True)
    for i, (feature, stage) in enumerate(zip(got, stages)):
        norm = official[f"backbone.norm{i}.weight"], official[f"backbone.norm{i}.bias"]
        expected = F.layer_norm(stage.permute(0, 2, 3, 1), stage.shape[1:2], *norm).permute(0, 3, 1, 2)
        torch.testing.assert_close(feature, expected, rtol=1e-4, atol=1e-4)


def test_swin_with_another_window_raises():
    official = {"backbone.layers.0.blocks.0.attn.relative_position_bias_table": torch.zeros(529, 4)}
    with pytest.raises(ValueError, match="window 12"):
        convert_official(official)
