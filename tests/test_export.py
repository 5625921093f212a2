"""`segtrain export` in process: every semantic model config exports to ONNX and passes its parity
check (dynamic batch; a size other than the traced one, or a recorded fixed size that is then
enforced); TorchScript and torch.export; Mask R-CNN; a perturbed graph fails loudly and leaves no
file; models and formats that cannot be exported say so."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict

from segtrain.exporting import runtime
from segtrain.exporting.command import export
from segtrain.exporting.graphs import ExportError
from segtrain.utils.checkpoint import save_checkpoint

pytestmark = pytest.mark.usefixtures("no_downloads")


@pytest.fixture(autouse=True)
def _no_hydra_run():
    """export() is called in process: no Hydra run state left by an earlier test (its overrides
    would edit the stored config, its output_dir may be unset)."""
    HydraConfig.instance().cfg = None
    yield
    HydraConfig.instance().cfg = None
onnxruntime = pytest.importorskip("onnxruntime", reason="the export extra: pip install 'segtrain[export]'")

MODEL_DIR = Path(__file__).resolve().parents[1] / "conf" / "model"
SEMANTIC_MODELS = sorted(p.stem for p in MODEL_DIR.glob("*.yaml")
                         if "/task@_global_.task: semantic" in p.read_text())
# torchvision's segmentation builders (fixed ResNet-50/101 and MobileNet architectures, 30-70 s
# each here) share one code path: the smallest always runs, the rest with SEGTRAIN_EXPORT_ALL=1.
TORCHVISION_BUILDER = "segtrain.models.torchvision_seg.build_torchvision_segmentation"
ALWAYS = "lraspp_mobilenet_v3_large"
CONTRACT = [name if name == ALWAYS or TORCHVISION_BUILDER not in (MODEL_DIR / f"{name}.yaml").read_text()
            else pytest.param(name, marks=pytest.mark.skipif(not os.environ.get("SEGTRAIN_EXPORT_ALL"),
                                                             reason="slow; SEGTRAIN_EXPORT_ALL=1 runs it"))
            for name in SEMANTIC_MODELS]
# 32-px synthetic images, 2 validation images: enough for a batch of 2 and one of 1.
SMALL_DATA = ["dataset.val.num_samples=2", "dataset.val.image_size=32", "trainer.device=cpu"]
# Smaller versions of the configs that name a backbone (the torchvision builders have none).
SHRINK = {"unet": ["model.base_channels=4", "model.depth=3"],
          "fcn": ["model.backbone=resnet18", "model.output_stride=32"],
          "deeplabv3plus": ["model.backbone=resnet18", "model.output_stride=32"],
          "pspnet": ["model.backbone=resnet18", "model.output_stride=32"],
          "upernet": ["model.backbone=resnet18"]}
# What torch's ONNX exporter refuses, at any size: adaptive pooling to fixed bins (PSPNet's
# and UPerNet's pyramid pooling modules) needs input sizes the TorchScript-based exporter
# does not track.
ONNX_UNSUPPORTED = {"pspnet": "adaptive_avg_pool2d", "upernet": "adaptive_avg_pool2d"}
MASKRCNN = ["model=maskrcnn_small", "dataset=synthetic_instance", "dataset.val.num_samples=1",
            "dataset.val.image_size=64", "model.min_size=64", "model.max_size=64",
            "model.rpn_pre_nms_top_n_test=50", "model.rpn_post_nms_top_n_test=20",
            "model.box_detections_per_img=20", "trainer.device=cpu"]


def make_checkpoint(path: Path, overrides: list[str], seed: int = 0) -> Path:
    """A segtrain checkpoint of an untrained model (what `segtrain train` stores: model weights,
    the run config as YAML, the class metadata), without training it."""
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="segtrain.conf", version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    GlobalHydra.instance().clear()
    with open_dict(cfg):
        del cfg["trust"]
    meta = instantiate(cfg.dataset.val).meta
    torch.manual_seed(seed)
    model = instantiate(cfg.model)
    save_checkpoint({"model": model.state_dict(), "config": OmegaConf.to_yaml(cfg), "meta": meta.to_dict()},
                    path)
    return path


def export_cfg(ckpt: Path, *overrides: str):
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="segtrain.conf", version_base="1.3"):
        cfg = compose("export", overrides=[f"ckpt={ckpt}", *overrides])
    GlobalHydra.instance().clear()
    return cfg


def _eager_logits(ckpt: Path, images: torch.Tensor) -> torch.Tensor:
    """The checkpoint's model on pixel values (N, 3, H, W), normalised as the task does."""
    from segtrain.model_loading import load_model_from_checkpoint

    loaded = load_model_from_checkpoint(ckpt, export_cfg(ckpt), [], lambda _: torch.device("cpu"))
    with torch.no_grad():
        return loaded.model(loaded.task.normalize(images))["out"]


@pytest.mark.parametrize("name", CONTRACT)
def test_every_semantic_model_exports_to_onnx_and_matches_the_eager_model(name, tmp_path):
    ckpt = make_checkpoint(tmp_path / "m.pt", [f"model={name}", *SMALL_DATA, *SHRINK.get(name, [])])
    if name in ONNX_UNSUPPORTED:
        expected = rf"model \w+\(backbone=\w+\) cannot be exported as format=onnx: .*{ONNX_UNSUPPORTED[name]}"
        with pytest.raises(ExportError, match=expected):
            export(export_cfg(ckpt, "format=onnx", "num_images=1"))
        assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]
        return
    report = export(export_cfg(ckpt, "format=onnx", "num_images=1"))
    path = tmp_path / "m.onnx"
    assert report["output"] == str(path) and path.is_file()
    assert all(figure["ok"] for figure in report["parity"].values())
    assert report["parity"]["max |diff| logits"]["value"] <= 1e-3
    run, metadata = runtime.onnx_runner(path)
    assert metadata["family"] == "semantic" and metadata["meta"]["classes"][0] == "background"
    assert metadata["fixed_size"] == report["fixed_size"]
    model = runtime.ExportedModel(run, "semantic", metadata["fixed_size"], str(path))
    # Batch 3 (the trace had 2; a fixed-size graph is called once per image), checked again here.
    images = torch.randint(0, 256, (3, 3, 32, 32)).float()
    assert torch.allclose(model(images)["out"], _eager_logits(ckpt, images), atol=1e-3)
    other = torch.randint(0, 256, (1, 3, 45, 71)).float()
    if report["fixed_size"] is None:  # the size stayed dynamic: another size matches too
        assert torch.allclose(model(other)["out"], _eager_logits(ckpt, other), atol=1e-3)
    else:  # recorded, and enforced before the runtime sees the images
        assert report["fixed_size"] == [32, 32]
        with pytest.raises(ValueError, match=r"fixed image size \[32, 32\]"):
            model(other)


@pytest.mark.parametrize("fmt", ["torchscript", "exported_program"])
def test_torchscript_and_exported_program_keep_a_dynamic_batch_and_size(fmt, tmp_path):
    # 64 px: at 32 px the stride-32 features are 1 x 1, and torch.export specialises sizes of 1.
    ckpt = make_checkpoint(tmp_path / "m.pt", ["model=fcn", *SMALL_DATA, "dataset.val.image_size=64",
                                               *SHRINK["fcn"]])
    report = export(export_cfg(ckpt, f"format={fmt}", "dynamic_size=true", "num_images=1"))
    suffix = {"torchscript": ".ts", "exported_program": ".pt2"}[fmt]
    assert report["fixed_size"] is None and Path(report["output"]) == tmp_path / f"m{suffix}"
    assert report["parity"]["label map agreement"]["value"] == 1.0
    run = runtime.torch_runner(Path(report["output"]), fmt, "semantic")
    for shape in [(3, 3, 64, 64), (1, 3, 45, 71)]:
        images = torch.randint(0, 256, shape).float()
        assert torch.allclose(run(images)[0], _eager_logits(ckpt, images), atol=1e-4)


def test_unet_padding_branch_gives_a_fixed_size_export_or_an_error_when_asked_for_dynamic(tmp_path):
    """The U-Net pads to a multiple of 2**depth in Python: traced at 64 px (no padding), the graph
    cannot take odd sizes. auto records the fixed size with a warning; true is an error."""
    ckpt = make_checkpoint(tmp_path / "m.pt", ["model=unet", *SMALL_DATA, *SHRINK["unet"]])
    with pytest.raises(ExportError, match="does not keep the image size dynamic.*m.ts was not written"):
        export(export_cfg(ckpt, "format=torchscript", "dynamic_size=true"))
    assert not (tmp_path / "m.ts").exists() and list(tmp_path.glob(".m.*")) == []
    report = export(export_cfg(ckpt, "format=torchscript"))
    assert report["fixed_size"] == [32, 32]


def test_maskrcnn_exports_to_onnx_and_torchscript_with_matched_detections(tmp_path):
    ckpt = make_checkpoint(tmp_path / "r.pt", MASKRCNN)
    onnx_report = export(export_cfg(ckpt, "format=onnx"))
    assert onnx_report["family"] == "instance" and onnx_report["fixed_size"] is None
    figures = onnx_report["parity"]
    assert figures["unmatched detections"]["value"] == 0 and figures["max |diff| boxes (px)"]["value"] < 0.5
    assert figures["max |diff| scores"]["value"] < 1e-3 and figures["max |diff| masks"]["value"] < 1e-3
    # torchvision's scripted resize computes its scale in float32 and picks other detections than
    # this untrained model's eager one at sizes it must rescale (auto would find that and fall
    # back to the traced size, as the U-Net test shows): exported at its size directly.
    ts_report = export(export_cfg(ckpt, "format=torchscript", "dynamic_size=false"))
    assert ts_report["parity"]["unmatched detections"]["value"] == 0 and ts_report["fixed_size"] == [64, 64]
    assert (tmp_path / "r.onnx").is_file() and (tmp_path / "r.ts").is_file()


def test_maskrcnn_as_exported_program_is_a_clear_error_naming_model_and_format(tmp_path):
    ckpt = make_checkpoint(tmp_path / "r.pt", MASKRCNN)
    with pytest.raises(ExportError, match=r"model build_maskrcnn\(backbone=resnet18\) cannot be exported "
                                          r"as format=exported_program: \w+"):
        export(export_cfg(ckpt, "format=exported_program"))
    assert list(tmp_path.iterdir()) == [ckpt]


def test_a_perturbed_graph_fails_the_parity_check_loudly_and_leaves_no_file(tmp_path, monkeypatch, capsys):
    ckpt = make_checkpoint(tmp_path / "m.pt", ["model=fcn", *SMALL_DATA, *SHRINK["fcn"]])
    real = runtime.onnx_runner

    def noisy(path, device=None):
        run, metadata = real(path, device)
        return (lambda x: tuple(out + 0.01 * torch.randn_like(out) for out in run(x))), metadata

    monkeypatch.setattr("segtrain.exporting.command.onnx_runner", noisy)
    with pytest.raises(ExportError, match=r"parity check failed: .* max \|diff\| logits = 0\.0\d+ .*"
                                          r"the limit is <= 0\.001 .*m\.onnx was not written"):
        export(export_cfg(ckpt, "format=onnx", "dynamic_size=false"))
    assert "FAIL" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]


MASK2FORMER = ["experiment=synthetic_mask2former", "dataset.val.num_samples=1", "trainer.device=cpu",
               "model.hidden_dim=32", "model.mask_dim=32", "model.num_queries=8", "model.dim_feedforward=64",
               "model.dec_layers=2", "model.enc_layers=1", "model.enc_dim_feedforward=64"]


def test_mask2former_onnx_names_model_and_format_when_the_runtime_cannot_run_it(tmp_path):
    """Mask2Former's masked attention exports to ONNX, but ONNX Runtime has no kernel for one of
    its ops (Where over bool masks): reported as the export's failure, with nothing written."""
    ckpt = make_checkpoint(tmp_path / "q.pt", MASK2FORMER)
    with pytest.raises(ExportError, match=r"build_mask2former\(backbone=resnet18\) .*format=onnx"):
        export(export_cfg(ckpt, "format=onnx", "num_images=1"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.pt"]


def test_mask2former_torchscript_matches_raw_outputs_and_panoptic_maps_at_its_size(tmp_path):
    """The trace bakes the deformable attention's spatial shapes: auto keeps the traced size, where
    raw outputs, label maps and the panoptic merge (the task's Python) equal the eager model's."""
    ckpt = make_checkpoint(tmp_path / "q.pt", MASK2FORMER)
    report = export(export_cfg(ckpt, "format=torchscript", "num_images=1"))
    assert report["family"] == "mask2former" and report["fixed_size"] == [64, 64]
    figures = report["parity"]
    assert max(figures[f"max |diff| {name}"]["value"] for name in ("pred_masks", "pred_logits")) <= 1e-4
    assert figures["panoptic map agreement"]["value"] == figures["label map agreement"]["value"] == 1.0


def test_existing_output_unknown_format_and_missing_checkpoint_are_refused_before_any_work(tmp_path):
    ckpt = make_checkpoint(tmp_path / "m.pt", ["model=unet", *SMALL_DATA, *SHRINK["unet"]])
    (tmp_path / "m.onnx").write_text("keep me")
    with pytest.raises(FileExistsError, match="m.onnx already exists; pass overwrite=true"):
        export(export_cfg(ckpt))
    assert (tmp_path / "m.onnx").read_text() == "keep me"
    with pytest.raises(ValueError, match="format=tflite; expected one of onnx, torchscript, exported_prog"):
        export(export_cfg(ckpt, "format=tflite"))
    with pytest.raises(ValueError, match=r"a format=exported_program file ends in \.pt2"):
        export(export_cfg(ckpt, "format=exported_program", f"output={tmp_path / 'm.onnx'}"))
    with pytest.raises(FileNotFoundError, match="nope.pt: checkpoint file not found"):
        export(export_cfg(tmp_path / "nope.pt"))


def test_panoptic_fpn_is_not_an_export_family(tmp_path):
    ckpt = make_checkpoint(tmp_path / "p.pt", [
        "experiment=synthetic_panoptic_fpn", "dataset.val.num_samples=1", "model.min_size=64",
        "model.max_size=64", "trainer.device=cpu"])
    with pytest.raises(ExportError, match="covers semantic models, Mask R-CNN and Mask2Former; .*Panoptic"):
        export(export_cfg(ckpt))


def test_exported_files_are_told_apart_from_checkpoints(tmp_path):
    ckpt = make_checkpoint(tmp_path / "m.pt", ["model=unet", *SMALL_DATA, *SHRINK["unet"]])
    report = export(export_cfg(ckpt, "format=torchscript", f"output={tmp_path / 'scripted.pt'}"))
    assert runtime.exported_format(report["output"]) == "torchscript"
    assert runtime.exported_format(ckpt) is None
    assert runtime.exported_format("x.onnx") == "onnx"
    assert runtime.exported_format("x.pt2") == "exported_program"
    with pytest.raises(ValueError, match="runs serialized code"):
        runtime.check_predictable(report["output"])
    assert json.loads((tmp_path / "export.json").read_text())["format"] == "torchscript"
