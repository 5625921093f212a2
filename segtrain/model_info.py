"""`segtrain model-info`: parameters, FLOPs and forward latency of a model config, built from scratch.

Only `model_info(cfg)` sees the config; the counting functions take a plain model and inputs.
FLOPs are torch's own count (`torch.utils.flop_counter.FlopCounterMode`): 2 per multiply-add of
matrix products, convolutions and attention. Papers, fvcore and mmcv's get_flops call
multiply-adds "FLOPs"; both numbers are reported.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import textwrap
import time
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

log = logging.getLogger("segtrain.model_info")

# What FlopCounterMode's registry holds (torch 2.x): mm, addmm, bmm, baddbmm, _scaled_mm,
# convolutions (transposed too) and scaled-dot-product / flex attention. Everything else is 0.
NOT_COUNTED = ("FlopCounterMode counts matrix products (linear layers, matmul/bmm, einsum through "
               "them), convolutions and fused attention, 2 FLOPs per multiply-add, without biases; "
               "it counts nothing for elementwise ops, normalisation (BatchNorm/LayerNorm/GroupNorm), "
               "activations, softmax outside fused attention, pooling, interpolation/grid_sample, "
               "RoIAlign, NMS and other custom ops (torchvision::roi_align, nms).")
RESIZING = ("instance/panoptic models resize their input to min_size/max_size (and pad it to a "
            "multiple of 32) before the backbone: FLOPs and latency are at the resized size; the "
            "RoI heads' share depends on the proposals and detections of this (untrained) model.")


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(all parameters, those with requires_grad), each counted once even if shared."""
    params = list(model.parameters())  # nn.Module.parameters() already yields a shared one once
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def _attention_flops(query_shape, key_shape, value_shape, *args: Any, **kwargs: Any) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# Fused attention kernels torch's registry lacks: the CPU flash kernel that
# F.scaled_dot_product_attention runs on CPU (without it, SegFormer-B0 counts 1 GMAC short of
# the paper's 8.4 at 512x512).
_UNREGISTERED_ATTENTION = {
    getattr(torch.ops.aten, name): _attention_flops
    for name in ("_scaled_dot_product_flash_attention_for_cpu",
                 "_scaled_dot_product_fused_attention_overrideable")
    if hasattr(torch.ops.aten, name)
}


def count_flops(model: nn.Module, inputs: Any) -> dict[str, int]:
    """FLOPs of one eval-mode forward `model(inputs)` under torch.no_grad, as FlopCounterMode counts
    them: {"total": n, "<child>": n for each top-level child that did any}. 2 FLOPs = 1 MAC."""
    counter = FlopCounterMode(display=False, custom_mapping=_UNREGISTERED_ATTENTION)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), counter:
            model(inputs)
    finally:
        model.train(was_training)
    total = int(counter.get_total_flops())
    by_name = {name: int(sum(ops.values())) for name, ops in counter.get_flop_counts().items()}
    root = type(model).__name__
    children: dict[str, int] = {}
    for name, flops in by_name.items():
        parent, _, path = name.partition(".")
        if parent != root or not path:
            continue
        child = path.split(".")[0]
        # A ModuleList/ModuleDict is never called itself: its entries ("decoder.0") sum up.
        if path.count(".") == 0 or (path.count(".") == 1 and f"{root}.{child}" not in by_name):
            children[child] = children.get(child, 0) + flops
    counts = {"total": total, **{k: v for k, v in children.items() if v}}
    if total - sum(children.values()) > 0:  # products in the model's own forward, outside children
        counts["other"] = total - sum(children.values())
    return counts


def measure_latency(model: nn.Module, inputs: Any, device: torch.device, warmup: int = 2,
                    runs: int = 10) -> dict[str, float]:
    """Forward time in ms of `model(inputs)` in eval mode under torch.no_grad: {"median", "p90"}
    over `runs` timed forwards after `warmup` untimed ones (CUDA synchronised around each)."""
    model.eval()
    times = []
    with torch.no_grad():
        for i in range(warmup + runs):
            _synchronize(device)
            start = time.perf_counter()
            model(inputs)
            _synchronize(device)  # CUDA runs asynchronously: wait for the kernels, not the launch
            if i >= warmup:
                times.append((time.perf_counter() - start) * 1000.0)
    ordered = sorted(times)
    return {"median": statistics.median(ordered), "p90": ordered[math.ceil(0.9 * len(ordered)) - 1]}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# Tasks whose models take a float batch (B, 3, H, W); the others' (torchvision detectors) take
# lists of images that their own transform resizes.
TENSOR_INPUT_TASKS = ("semantic", "mask2former")


def example_inputs(task: str, batch_size: int, size: tuple[int, int], device: torch.device) -> Any:
    """A random batch as the task's model takes it: semantic models and Mask2Former a float tensor
    (B, 3, H, W); instance/panoptic (torchvision detectors) a list of B float images (3, H, W) in
    [0, 1]."""
    if task in TENSOR_INPUT_TASKS:
        return torch.rand(batch_size, 3, *size, device=device)
    return [torch.rand(3, *size, device=device) for _ in range(batch_size)]


def model_info(cfg: DictConfig) -> dict[str, Any]:
    """Build `cfg.model` (for `cfg.dataset`'s class counts), count its parameters and FLOPs at
    `cfg.input_size`, time it on `cfg.device`; print a table and write it as JSON to `cfg.output`
    (default: model_info.json in the run directory). Returns the report."""
    from hydra.utils import instantiate

    from segtrain.config_check import check_config
    from segtrain.engine.trainer_config import resolve_device

    size, batch_size, warmup, runs = _check_options(cfg)
    device = resolve_device(str(cfg.device))
    check_config(OmegaConf.masked_copy(cfg, ["dataset", "model"]))  # the model's keys and types
    task = _task_name(cfg)
    model = instantiate(cfg.model).to(device).eval()
    total, trainable = count_parameters(model)
    inputs = example_inputs(task, batch_size, size, device)
    with _RoiCounts(model) as rois:
        flops = count_flops(model, inputs)
    latency = measure_latency(model, inputs, device, warmup, runs)
    info = {
        "model": HydraConfig.get().runtime.choices.get("model") if HydraConfig.initialized() else None,
        "target": str(cfg.model._target_),
        "backbone": OmegaConf.select(cfg, "model.backbone"),
        "task": task,
        "input_size": list(size),
        "model_input_size": _model_input_size(model, inputs),
        "batch_size": batch_size,
        "parameters": total,
        "trainable_parameters": trainable,
        "flops": flops["total"],
        "gflops": flops["total"] / 1e9,
        "gmacs": flops["total"] / 2e9,
        "flops_by_module": {k: v for k, v in flops.items() if k != "total"},
        "not_counted": NOT_COUNTED,
        "device": str(device),
        "latency_ms": {**latency, "warmup": warmup, "runs": runs},
    }
    if task not in TENSOR_INPUT_TASKS:
        info["note"] = RESIZING
    if rois.counts:
        info["rois"] = rois.counts
    print(format_table(info))
    output = Path(cfg.output or Path(HydraConfig.get().runtime.output_dir) / "model_info.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(info, indent=2) + "\n")
    log.info("wrote %s", output)
    return info


def format_table(info: dict[str, Any]) -> str:
    """The report as aligned `key  value` lines, then the notes as sentences."""
    h, w = info["input_size"]
    rows = [
        ("model", f"{info['model'] or ''} ({info['target']})".strip()),
        ("backbone", str(info["backbone"] or "-")),
        ("parameters", f"{info['parameters'] / 1e6:.2f} M ({info['parameters']:,})"),
        ("trainable", f"{info['trainable_parameters'] / 1e6:.2f} M ({info['trainable_parameters']:,})"),
        ("input", f"{info['batch_size']} x 3 x {h} x {w}"),
    ]
    if info["model_input_size"] != info["input_size"]:
        mh, mw = info["model_input_size"]
        rows.append(("model input", f"{mh} x {mw} (after the model's resize and padding)"))
    rows += [
        ("GFLOPs", f"{info['gflops']:.2f} (torch FlopCounterMode: 2 per multiply-add)"),
        ("GMACs", f"{info['gmacs']:.2f} (multiply-adds: papers', fvcore's, mmcv's \"FLOPs\")"),
        *((f"  {name}", f"{count / 1e9:.2f} GFLOPs") for name, count in info["flops_by_module"].items()),
    ]
    if "rois" in info:
        proposals, detections = (", ".join(map(str, info["rois"].get(key, [])))
                                 for key in ("proposals", "detections"))
        rows.append(("RoIs", f"{proposals} proposals (box head), {detections} detections (mask head) "
                             "per image"))
    latency = info["latency_ms"]
    rows.append(("latency", f"median {latency['median']:.1f} ms, p90 {latency['p90']:.1f} ms "
                            f"({latency['runs']} runs on {info['device']}, no_grad)"))
    width = max(len(key) for key, _ in rows)
    lines = [f"{key:<{width}}  {value}" for key, value in rows]
    notes = [info["not_counted"], *([info["note"]] if "note" in info else [])]
    return "\n".join([*lines, "", *(textwrap.fill(note, 100) for note in notes)])


class _RoiCounts:
    """Within `with`, records a torchvision detector's proposals and detections per image (the RoI
    heads' FLOPs scale with them): `counts` = {"proposals": [...], "detections": [...]} or {}."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.counts, self.handles = model, {}, []

    def __enter__(self) -> _RoiCounts:
        rpn = getattr(self.model, "rpn", None)
        if isinstance(rpn, nn.Module):
            self.handles = [
                rpn.register_forward_hook(lambda m, i, out: self._record("proposals", out[0])),
                self.model.register_forward_hook(lambda m, i, out: self._record("detections", out)),
            ]
        return self

    def _record(self, key: str, per_image: list) -> None:
        self.counts[key] = [len(x["scores"] if isinstance(x, dict) else x) for x in per_image]

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()


def _model_input_size(model: nn.Module, inputs: Any) -> list[int]:
    """(H, W) the network itself sees: a detector's transform resizes and pads its images."""
    transform = getattr(model, "transform", None)
    if isinstance(inputs, list) and transform is not None:
        with torch.no_grad():
            batch, _ = transform(inputs[:1])
        return list(batch.tensors.shape[-2:])
    shape = inputs.shape if isinstance(inputs, torch.Tensor) else inputs[0].shape
    return list(shape[-2:])


def _task_name(cfg: DictConfig) -> str:
    """semantic | instance | panoptic, from the task the model config selects."""
    target = OmegaConf.select(cfg, "task._target_")
    if target is None:
        raise ValueError(f"model._target_={cfg.model._target_}: its config selects no task "
                         "(`defaults: [/task@_global_.task: semantic]`), so the input format is unknown")
    return str(target).rsplit(".", 2)[-2]  # segtrain.tasks.<name>.<Class>


def _check_options(cfg: DictConfig) -> tuple[tuple[int, int], int, int, int]:
    """Clear errors for model-info's own keys, before the model is built."""
    size = cfg.input_size
    if isinstance(size, int) and not isinstance(size, bool):
        size = [size, size]
    if not (isinstance(size, (list, ListConfig)) and len(size) == 2
            and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)):
        given = cfg.input_size
        shown = OmegaConf.to_container(given) if isinstance(given, ListConfig) else given
        raise ValueError(f"input_size={shown}: "
                         "expected a positive int (a square image) or [H, W], e.g. input_size=512 "
                         "or input_size=[512,1024]")
    counts = {}
    for key, low in (("batch_size", 1), ("warmup", 0), ("runs", 1)):
        value = cfg[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{key}={value!r}: expected an integer >= {low}")
        counts[key] = value
    device = str(cfg.device)
    if device not in ("auto", "cpu", "cuda") and not (device.startswith("cuda:") and device[5:].isdigit()):
        raise ValueError(f"device={device!r}: expected auto, cpu, cuda or cuda:N")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device} but no CUDA device is available; use device=auto or cpu")
    return (int(size[0]), int(size[1])), counts["batch_size"], counts["warmup"], counts["runs"]
