"""`segtrain model-info`: parameter counts, torch's FLOP count against hand-computed ones, latency,
the table and JSON through the real CLI, detectors at their resized size, and clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_cli
from hydra.utils import instantiate
from torch import nn

from segtrain.model_info import count_flops, count_parameters, measure_latency, model_info
from segtrain.models.backbones import build_backbone

pytestmark = pytest.mark.usefixtures("no_downloads")


def test_parameters_are_every_numel_and_trainable_leaves_out_frozen_stages():
    backbone = build_backbone("resnet18", frozen_stages=1)  # stem and layer1 frozen
    total, trainable = count_parameters(backbone)
    assert total == sum(p.numel() for p in backbone.parameters())
    body = backbone.body
    frozen = sum(p.numel() for m in (body.conv1, body.bn1, body.layer1) for p in m.parameters())
    assert trainable == total - frozen > 0


def test_flops_of_convolutions_and_products_equal_the_hand_count_two_per_multiply_add():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16 * 16, 10))
    batch = 2
    conv_macs = batch * 8 * 3 * 3 * 3 * 16 * 16  # output elements x (in_channels x kernel area)
    linear_macs = batch * 8 * 16 * 16 * 10
    counts = count_flops(net, torch.rand(batch, 3, 16, 16))
    assert counts == {"total": 2 * (conv_macs + linear_macs), "0": 2 * conv_macs, "3": 2 * linear_macs}
    assert net.training, "counting leaves the module's mode as it was"


class _Attention(nn.Module):
    def forward(self, q: torch.Tensor) -> torch.Tensor:
        return nn.functional.scaled_dot_product_attention(q, q[:, :, :16], q[:, :, :16])


def test_fused_attention_on_cpu_counts_both_products():
    # CPU runs torch's own flash kernel, which torch's FLOP registry misses: counted here.
    batch, heads, queries, keys, dim = 2, 4, 64, 16, 8
    macs = 2 * batch * heads * queries * keys * dim  # q @ k^T, then attn @ v
    assert count_flops(_Attention(), torch.rand(batch, heads, queries, dim))["total"] == 2 * macs


def test_latency_reports_median_and_p90_of_the_timed_runs():
    latency = measure_latency(nn.Linear(4, 4), torch.rand(2, 4), torch.device("cpu"), warmup=1, runs=5)
    assert 0 < latency["median"] <= latency["p90"]


def test_cli_prints_the_table_and_writes_the_same_numbers_as_json(tmp_path, compose_cfg):
    output = tmp_path / "info.json"
    run = run_cli("model-info", "model=unet", "input_size=64", "runs=2", f"output={output}", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    for row in ("parameters", "trainable", "GFLOPs", "GMACs", "latency", "interpolation/grid_sample"):
        assert row in run.stdout
    info = json.loads(output.read_text())
    model = instantiate(compose_cfg("model_info", ["model=unet"]).model)
    assert info["parameters"] == sum(p.numel() for p in model.parameters())
    assert info["model"] == "unet" and info["task"] == "semantic" and info["input_size"] == [64, 64]
    assert info["flops"] > 0 and info["gmacs"] == pytest.approx(info["flops"] / 2e9)
    assert f"{info['gflops']:.2f}" in run.stdout
    assert info["latency_ms"]["runs"] == 2 and info["latency_ms"]["median"] > 0


def test_a_detector_is_counted_on_its_image_list_at_the_size_it_resizes_to(tmp_path, compose_cfg):
    cfg = compose_cfg("model_info", ["model=maskrcnn_small", "input_size=[48,64]", "runs=1", "warmup=0",
                                     "device=cpu", f"output={tmp_path / 'info.json'}"])
    info = model_info(cfg)
    assert info["task"] == "instance" and info["input_size"] == [48, 64]
    assert info["model_input_size"] == [96, 128]  # min_size=max_size=128: 48x64 -> 96x128
    assert "min_size/max_size" in info["note"]
    assert {"backbone", "rpn", "roi_heads"} <= set(info["flops_by_module"])
    assert info["rois"]["proposals"] == [50]  # maskrcnn_small's rpn_post_nms_top_n_test
    assert len(info["rois"]["detections"]) == 1
    assert sum(info["flops_by_module"].values()) == info["flops"]
    assert json.loads((tmp_path / "info.json").read_text())["flops"] == info["flops"]


def test_mask2former_is_counted_on_a_float_batch_by_its_three_parts(tmp_path, compose_cfg):
    cfg = compose_cfg("model_info", [
        "model=mask2former", "dataset=synthetic_panoptic", "model.backbone=resnet18", "model.hidden_dim=32",
        "model.mask_dim=32", "model.num_queries=8", "model.nheads=4", "model.dec_layers=3",
        "model.enc_layers=1", "input_size=[64,96]", "runs=1", "warmup=0", f"output={tmp_path / 'i.json'}"])
    info = model_info(cfg)
    assert info["task"] == "mask2former" and info["model_input_size"] == [64, 96] and "note" not in info
    assert set(info["flops_by_module"]) == {"backbone", "pixel_decoder", "predictor"}
    assert all(v > 0 for v in info["flops_by_module"].values())
    assert sum(info["flops_by_module"].values()) == info["flops"]


def test_trainable_parameters_leave_out_a_frozen_detector_backbone(tmp_path, compose_cfg):
    torch.save(build_backbone("regnet_y_400mf").body.state_dict(), tmp_path / "regnet.pth")
    cfg = compose_cfg("model_info", ["model=maskrcnn_small", "model.backbone=regnet_y_400mf",
                                     f"model.weights_backbone={tmp_path / 'regnet.pth'}",
                                     "model.trainable_layers=0", "input_size=32", "runs=1", "warmup=0",
                                     f"output={tmp_path / 'info.json'}"])
    info = model_info(cfg)
    model = instantiate(cfg.model)
    frozen = sum(p.numel() for p in model.backbone.body.parameters())
    assert info["trainable_parameters"] == info["parameters"] - frozen


@pytest.mark.parametrize(("override", "message"), [
    ("input_size=0", "input_size=0: expected a positive int"),
    ("input_size=[1,2,3]", "input_size=[1, 2, 3]"),
    ("runs=0", "runs=0: expected an integer >= 1"),
    ("device=gpu", "device='gpu': expected auto, cpu, cuda or cuda:N"),
    ("+model.widht=8", "model.widht: .* takes no parameter 'widht'"),
])
def test_bad_values_are_errors_naming_the_key(compose_cfg, tmp_path, override, message):
    cfg = compose_cfg("model_info", ["model=unet", override, f"output={tmp_path / 'info.json'}"])
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("+", "")):
        model_info(cfg)


def test_a_bad_key_on_the_command_line_is_one_clear_message(tmp_path):
    run = run_cli("model-info", "model=unet", "input_size=0", cwd=tmp_path)
    assert run.returncode == 1
    assert "input_size=0: expected a positive int" in run.stderr and "Traceback" not in run.stderr


def test_the_command_is_listed_in_the_usage_and_has_hydra_help(tmp_path):
    usage = run_cli("--help", cwd=tmp_path)
    assert usage.returncode == 0 and "  model-info" in usage.stdout
    helped = run_cli("model-info", "--help", cwd=tmp_path)
    assert helped.returncode == 0, helped.stderr
    assert "segtrain model-info is powered by Hydra" in helped.stdout and "maskrcnn_small" in helped.stdout
