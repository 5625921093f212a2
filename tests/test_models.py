"""Model contract over every conf/model YAML, U-Net behaviour, and offline weight loading."""

from __future__ import annotations

import inspect
import logging
from pathlib import Path

import pytest
import torch
import torchvision
from hydra.utils import get_object, instantiate
from omegaconf import OmegaConf

from segtrain.models import UNet, build_torchvision_segmentation, load_state_dict_from_spec
from segtrain.models.unet import _group_count
from segtrain.models.weights import load_matching, resolve_weights

pytestmark = pytest.mark.usefixtures("no_downloads")  # any weight download fails the test

MODEL_DIR = Path(__file__).resolve().parents[1] / "conf" / "model"
MODEL_YAMLS = sorted(MODEL_DIR.glob("*.yaml"))
LRASPP_FILE = "lraspp_mobilenet_v3_large-d234d4ea.pth"
MOBILENET_FILE = "mobilenet_v3_large-8738ca79.pth"
# Instance segmentation models follow torchvision's detection contract instead of {"out": ...}.
INSTANCE_MODELS = {"maskrcnn", "maskrcnn_v2", "maskrcnn_small", "ms_rcnn"}
# Panoptic FPN: the detection contract plus `sem_seg` logits; keyword args pass to build_maskrcnn.
PANOPTIC_MODELS = {"panoptic_fpn", "panoptic_fpn_small"}
# Query-based models: per-query class logits (+ "no object") and mask logits at stride 4.
QUERY_MODELS = {"mask2former"}
# Spatial embeddings: a U-Net whose "out" holds 2 offsets + n_sigma sigma + one seed map per thing.
EMBEDDING_MODELS = {"spatial_embeddings"}


def _model_cfg(path: Path):
    """A model YAML without its Hydra `defaults` list (which selects the model's task)."""
    cfg = OmegaConf.load(path)
    cfg.pop("defaults", None)
    return cfg


def _outputs(model: torch.nn.Module, size=(64, 64), batch: int = 2) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(batch, 3, *size)
    with torch.no_grad():
        return model.eval()(x)


def _lraspp(num_classes: int = 21, **kwargs) -> torch.nn.Module:
    torch.manual_seed(kwargs.pop("seed", 0))
    return build_torchvision_segmentation("lraspp_mobilenet_v3_large", num_classes, **kwargs)


# ---------------------------------------------------------------------------- config contract
def test_every_torchvision_builder_has_a_config():
    from segtrain.models.torchvision_seg import MODELS

    encoder_decoders = {"unet", "fcn", "deeplabv3plus", "pspnet", "upernet", "segformer"}
    assert {path.stem for path in MODEL_YAMLS} == (set(MODELS) | encoder_decoders | INSTANCE_MODELS
                                                   | PANOPTIC_MODELS | QUERY_MODELS | EMBEDDING_MODELS)


@pytest.mark.parametrize("path", MODEL_YAMLS, ids=lambda p: p.stem)
def test_model_config_keys_are_the_constructor_keywords(path):
    lines = path.read_text().splitlines()
    assert lines[0].startswith("# ") and len(lines[0]) > 10, "first line: what the model is"
    cfg = _model_cfg(path)
    keywords = set(inspect.signature(get_object(cfg._target_)).parameters)
    if path.stem in PANOPTIC_MODELS:
        from segtrain.models.maskrcnn import build_maskrcnn

        keywords |= set(inspect.signature(build_maskrcnn).parameters) - {"num_classes"}
        raw = OmegaConf.to_container(cfg)
        assert (raw["num_things"], raw["num_stuff"]) == ("${oc.select:dataset.num_things,null}",
                                                         "${oc.select:dataset.num_stuff,null}")
    else:
        assert OmegaConf.to_container(cfg)["num_classes"] == "${dataset.num_classes}"
    assert set(cfg) - {"_target_"} <= keywords


@pytest.mark.parametrize("path", MODEL_YAMLS, ids=lambda p: p.stem)
def test_model_config_instantiates_and_obeys_the_output_contract(path):
    cfg = OmegaConf.merge({"dataset": {"num_classes": 5, "num_things": 4, "num_stuff": 2}},
                          {"model": _model_cfg(path)})
    if path.stem in INSTANCE_MODELS | PANOPTIC_MODELS:  # 64-px inputs, few proposals: R50 fast on CPU
        cfg.model.merge_with({"min_size": 64, "max_size": 64, "rpn_pre_nms_top_n_test": 50,
                              "rpn_post_nms_top_n_test": 20})
    model = instantiate(cfg.model)
    names = [name for name, _ in model.named_parameters()]
    assert any(n.startswith("backbone.") for n in names)
    assert any(not n.startswith("backbone.") for n in names), "a head outside the backbone"
    if path.stem in INSTANCE_MODELS | PANOPTIC_MODELS:
        outputs = _check_instance_outputs(model, num_classes=5)
        if path.stem in PANOPTIC_MODELS:  # 4 things + background; 2 stuff + one "things" class
            assert [tuple(o["sem_seg"].shape) for o in outputs] == [(3, 64, 48), (3, 40, 64)]
        return
    if path.stem in QUERY_MODELS:
        out = _outputs(model, size=(64, 96))
        queries = cfg.model.num_queries
        assert out["pred_logits"].shape == (2, queries, 6)  # 5 classes + "no object"
        assert out["pred_masks"].shape == (2, queries, 16, 24)
        assert all(torch.isfinite(v).all() for v in out.values())
        return
    if path.stem in EMBEDDING_MODELS:  # 4 things (dataset.num_things)
        out = _outputs(model, size=(64, 48))
        assert set(out) == {"out"} and out["out"].shape == (2, 2 + cfg.model.n_sigma + 4, 64, 48)
        assert torch.isfinite(out["out"]).all()
        return
    aux_on = bool(cfg.model.get("aux_loss", cfg.model.get("aux_head", False)))
    out = _outputs(model, size=(64, 48))
    assert set(out) == ({"out", "aux"} if aux_on else {"out"})
    for logits in out.values():
        assert logits.shape == (2, 5, 64, 48)
        assert logits.dtype == torch.float32
        assert torch.isfinite(logits).all()


def _check_instance_outputs(model: torch.nn.Module, num_classes: int) -> list[dict]:
    """Eval mode: per image boxes (N, 4), labels in 1..C-1, scores, masks (N, 1, H, W)."""
    sizes = [(64, 48), (40, 64)]
    torch.manual_seed(0)
    with torch.no_grad():
        outputs = model.eval()([torch.rand(3, *size) for size in sizes])
    assert len(outputs) == len(sizes)
    for output, size in zip(outputs, sizes):
        n = len(output["scores"])
        assert output["boxes"].shape == (n, 4) and output["masks"].shape == (n, 1, *size)
        assert ((output["labels"] >= 1) & (output["labels"] < num_classes)).all()
        assert torch.isfinite(output["boxes"]).all() and torch.isfinite(output["masks"]).all()
    return outputs


def test_default_unet_is_small():
    model = UNet(num_classes=5)
    count = sum(p.numel() for p in model.parameters())
    # widths 8..128, two 3x3 convs per level, transposed-conv decoder: 486,589 parameters.
    assert count == 486_589


# ---------------------------------------------------------------------------- U-Net behaviour
@pytest.mark.parametrize("size", [(70, 90), (1, 1), (17, 64), (64, 64)])
def test_unet_logits_have_the_input_size_for_any_size(size):
    model = UNet(num_classes=3, base_channels=4, depth=3, aux_head=True)
    out = _outputs(model, size=size, batch=1)
    assert out["out"].shape == (1, 3, *size)
    assert out["aux"].shape == (1, 3, *size)


def test_unet_pads_bottom_right_with_zeros_and_crops_the_top_left():
    torch.manual_seed(0)
    model = UNet(num_classes=3, base_channels=4, depth=2).eval()
    x = torch.randn(1, 3, 14, 14)
    padded = torch.zeros(1, 3, 16, 16)
    padded[..., :14, :14] = x
    with torch.no_grad():
        cropped = model(x)["out"]
        full = model(padded)["out"]
    assert cropped.shape == (1, 3, 14, 14)
    torch.testing.assert_close(cropped, full[..., :14, :14], rtol=0, atol=0)


@pytest.mark.parametrize("norm", ["bn", "gn", "none"])
def test_unet_gradients_reach_every_parameter(norm):
    torch.manual_seed(0)
    model = UNet(num_classes=4, base_channels=4, depth=3, norm=norm, aux_head=True)
    out = model(torch.randn(2, 3, 40, 24))
    target = torch.randint(0, 4, (2, 40, 24))
    loss = sum(torch.nn.functional.cross_entropy(v, target) for v in out.values())
    loss.backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert dead == []


def test_unet_channels_last_and_bf16_autocast_match_fp32():
    torch.manual_seed(0)
    model = UNet(num_classes=3, base_channels=8, depth=3, aux_head=True).eval()
    x = torch.randn(2, 3, 40, 56)
    with torch.no_grad():
        reference = model(x)["out"]
        model_cl = model.to(memory_format=torch.channels_last)
        x_cl = x.to(memory_format=torch.channels_last)
        channels_last = model_cl(x_cl)["out"]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = model_cl(x_cl)
    torch.testing.assert_close(channels_last, reference, rtol=1e-4, atol=1e-4)
    assert mixed["out"].dtype == torch.bfloat16 and mixed["out"].shape == (2, 3, 40, 56)
    assert mixed["aux"].shape == (2, 3, 40, 56)
    error = (mixed["out"].float() - reference).abs().max() / reference.abs().max()
    assert error < 0.05


@pytest.mark.parametrize("channels", [1, 4, 8, 12, 14, 16, 24, 64, 96, 256, 512])
def test_group_norm_group_count_divides_the_width(channels):
    groups = _group_count(channels)
    assert channels % groups == 0 and 1 <= groups <= 32
    assert groups == {1: 1, 4: 1, 8: 2, 16: 4, 64: 16, 256: 32, 512: 32}.get(channels, groups)


@pytest.mark.parametrize(("kwargs", "fragment"), [
    ({"norm": "ln"}, "norm='ln'"), ({"depth": 0}, "depth=0"), ({"num_classes": 0}, "num_classes=0"),
])
def test_unet_rejects_invalid_arguments(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        UNet(**{"num_classes": 3, **kwargs})


# ---------------------------------------------------------------------- torchvision builder
def test_unknown_torchvision_model_lists_the_valid_names():
    with pytest.raises(ValueError, match="deeplabv3_resnet50.*lraspp_mobilenet_v3_large"):
        build_torchvision_segmentation("deeplabv4", 3)


def test_lraspp_with_aux_loss_says_it_has_no_auxiliary_head():
    with pytest.raises(ValueError, match="no auxiliary head"):
        build_torchvision_segmentation("lraspp_mobilenet_v3_large", 3, aux_loss=True)


def test_unknown_builder_options_are_rejected_not_ignored():
    with pytest.raises(ValueError, match="aux_los"):
        build_torchvision_segmentation("lraspp_mobilenet_v3_large", 3, aux_los=True)


# ------------------------------------------------------------------------------- weights
def test_local_state_dict_file_reproduces_the_saved_model(tmp_path):
    torch.manual_seed(0)
    saved = UNet(num_classes=3, base_channels=4, depth=2)
    path = tmp_path / "unet.pth"
    torch.save(saved.state_dict(), path)
    torch.manual_seed(1)
    loaded = UNet(num_classes=3, base_channels=4, depth=2, weights=str(path))
    torch.testing.assert_close(_outputs(loaded)["out"], _outputs(saved)["out"], rtol=0, atol=0)

    torch.save(_lraspp(seed=2).state_dict(), tmp_path / "lraspp.pt")
    reference = _outputs(_lraspp(seed=2))["out"]
    rebuilt = _lraspp(seed=3, weights=str(tmp_path / "lraspp.pt"))
    torch.testing.assert_close(_outputs(rebuilt)["out"], reference, rtol=0, atol=0)


def test_checkpoint_dicts_and_ddp_prefixes_are_unwrapped(tmp_path):
    model = UNet(num_classes=3, base_channels=4, depth=2)
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save({"model": state, "step": torch.tensor(5)}, tmp_path / "last.pt")
    loaded = load_state_dict_from_spec(str(tmp_path / "last.pt"))
    assert loaded.keys() == model.state_dict().keys()
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())


def test_class_count_mismatch_reinitialises_only_the_classifiers(tmp_path, caplog):
    torch.manual_seed(0)
    source = build_torchvision_segmentation("deeplabv3_mobilenet_v3_large", 21, aux_loss=True)
    torch.save(source.state_dict(), tmp_path / "voc.pth")
    torch.manual_seed(1)
    with caplog.at_level(logging.INFO, logger="segtrain.models.weights"):
        model = build_torchvision_segmentation(
            "deeplabv3_mobilenet_v3_large", 5, aux_loss=True, weights=str(tmp_path / "voc.pth"))
    head = {"classifier.4.weight", "classifier.4.bias", "aux_classifier.4.weight",
            "aux_classifier.4.bias"}
    file_state = source.state_dict()
    for key, value in model.state_dict().items():
        if key in head:
            assert value.shape[0] == 5 and file_state[key].shape[0] == 21
        else:
            assert torch.equal(value, file_state[key]), key
    assert all(key in caplog.text for key in head)
    assert _outputs(model)["out"].shape == (2, 5, 64, 64)


def test_unet_class_count_mismatch_keeps_the_encoder_and_decoder(tmp_path):
    torch.manual_seed(0)
    source = UNet(num_classes=7, base_channels=4, depth=2)
    torch.save(source.state_dict(), tmp_path / "unet.pth")
    model = UNet(num_classes=2, base_channels=4, depth=2, weights=str(tmp_path / "unet.pth"))
    differing = [k for k, v in model.state_dict().items()
                 if v.shape != source.state_dict()[k].shape
                 or not torch.equal(v, source.state_dict()[k])]
    assert differing == ["classifier.weight", "classifier.bias"]


def test_state_dict_of_another_architecture_raises_naming_keys(tmp_path):
    torch.save(UNet(num_classes=21, base_channels=4, depth=2).state_dict(), tmp_path / "u.pth")
    with pytest.raises(ValueError, match=r"backbone\.stages\.0\.0\.weight") as info:
        _lraspp(weights=str(tmp_path / "u.pth"))
    assert "u.pth" in str(info.value) and "missing from the file" in str(info.value)

    with pytest.raises(ValueError, match=r"backbone\.stages\.0\.0\.weight: file \(4, 3, 3, 3\) "
                                         r"vs model \(8, 3, 3, 3\)"):
        UNet(num_classes=21, base_channels=8, depth=2, weights=str(tmp_path / "u.pth"))


def test_load_matching_ignores_only_the_listed_extra_keys():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    state = {**model.state_dict(), "fc.weight": torch.zeros(1)}
    report = load_matching(model, state, ignore_prefixes=("fc.",))
    assert report.ignored == ["fc.weight"] and sorted(report.loaded) == ["0.bias", "0.weight"]
    with pytest.raises(ValueError, match=r"not in the model \(1\): fc\.weight"):
        load_matching(model, state)


def test_file_that_is_not_a_state_dict_is_a_value_error(tmp_path):
    torch.save({"epoch": 3, "note": "hello"}, tmp_path / "meta.pt")
    with pytest.raises(ValueError, match="'epoch', 'note'"):
        load_state_dict_from_spec(str(tmp_path / "meta.pt"))


def test_missing_local_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        resolve_weights(str(tmp_path / "nope.pth"))


def test_torchvision_weights_missing_from_the_cache_name_path_url_and_local_option(hub_cache):
    with pytest.raises(FileNotFoundError) as info:
        build_torchvision_segmentation(
            "deeplabv3_resnet50", 3, weights_backbone="ResNet50_Weights.IMAGENET1K_V1")
    message = str(info.value)
    assert str(hub_cache / "resnet50-0676ba61.pth") in message
    assert "https://download.pytorch.org/models/resnet50-0676ba61.pth" in message
    assert "model.weights_backbone=/path/to/file.pth" in message


@pytest.mark.parametrize(("spec", "fragment"), [
    ("ResNet50_Weights.IMAGENET9K", "IMAGENET1K_V2"),  # lists the enum's real entries
    ("Resnet_Weights.V1", "Resnet_Weights.V1"),
])
def test_unknown_torchvision_weights_name_is_a_value_error(spec, fragment):
    with pytest.raises(ValueError, match=fragment):
        resolve_weights(spec)


def test_torchvision_weights_in_the_cache_load(hub_cache):
    torch.save(_lraspp(seed=4).state_dict(), hub_cache / LRASPP_FILE)
    name = "LRASPP_MobileNet_V3_Large_Weights.COCO_WITH_VOC_LABELS_V1"
    assert resolve_weights(name) == hub_cache / LRASPP_FILE
    model = _lraspp(seed=5, weights=name)
    torch.testing.assert_close(_outputs(model)["out"], _outputs(_lraspp(seed=4))["out"],
                               rtol=0, atol=0)


def test_backbone_weights_load_into_the_backbone_only(hub_cache):
    torch.manual_seed(0)
    classifier = torchvision.models.mobilenet_v3_large()
    torch.save(classifier.state_dict(), hub_cache / MOBILENET_FILE)
    torch.manual_seed(1)
    fresh = build_torchvision_segmentation("deeplabv3_mobilenet_v3_large", 3)
    torch.manual_seed(1)
    model = build_torchvision_segmentation(
        "deeplabv3_mobilenet_v3_large", 3,
        weights_backbone="MobileNet_V3_Large_Weights.IMAGENET1K_V1")
    source = classifier.state_dict()
    for key, value in model.state_dict().items():
        if key.startswith("backbone."):
            assert torch.equal(value, source["features." + key[len("backbone."):]]), key
        else:  # the head keeps its (seeded) random init
            assert torch.equal(value, fresh.state_dict()[key]), key
