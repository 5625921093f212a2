"""What `segtrain export` writes: per model family, the network as one graph (pixels in, raw
tensors out) in ONNX, TorchScript or torch.export format, with segtrain's metadata embedded.

Only the network is exported; the family's pre-processing (batching, padding, resizing) and
post-processing (argmax, resizing back, Mask2Former's merges) stay the task's Python code, which
`segtrain predict` runs unchanged around the exported file.
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

FORMATS = ("onnx", "torchscript", "exported_program")
SUFFIXES = {"onnx": (".onnx",), "torchscript": (".ts", ".pt", ".torchscript"), "exported_program": (".pt2",)}
METADATA_KEY = "segtrain"  # ONNX metadata_props key / extra file name holding the JSON metadata
METADATA_VERSION = 1
OPSET = 17
# Task classes (segtrain.tasks.<module>.<Class>) -> the family name the export knows.
FAMILIES = {"SemanticTask": "semantic", "InstanceTask": "instance", "Mask2FormerTask": "mask2former"}
OUTPUT_NAMES = {"semantic": ("logits",), "instance": ("boxes", "labels", "scores", "masks"),
                "mask2former": ("pred_logits", "pred_masks")}


class ExportError(ValueError):
    """A model that cannot be exported in a format, or an export that fails its parity check."""


def family_of(task: Any) -> str:
    """The export family of a task object; ExportError for the families export does not cover."""
    name = type(task).__name__
    if name not in FAMILIES:
        raise ExportError(f"segtrain export covers semantic models, Mask R-CNN and Mask2Former; this "
                          f"checkpoint's task is {type(task).__module__}.{name}, which it does not")
    return FAMILIES[name]


class PixelGraph(nn.Module):
    """A batch model with its normalisation inside: images float32 (N, 3, H, W), RGB pixel values
    0..255 -> the model's raw outputs (semantic: logits (N, C, H, W); Mask2Former: pred_logits
    (N, Q, C + 1) and pred_masks (N, Q, H/4, W/4))."""

    def __init__(self, model: nn.Module, mean: torch.Tensor, std: torch.Tensor,
                 outputs: Sequence[str]) -> None:
        super().__init__()
        self.model, self.keys = model, tuple(outputs)
        self.register_buffer("mean", mean.reshape(1, 3, 1, 1).float().clone())
        self.register_buffer("std", std.reshape(1, 3, 1, 1).float().clone())

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = self.model((images - self.mean) / self.std)
        return tuple(outputs[key] for key in self.keys)


class DetectorGraph(nn.Module):
    """torchvision's Mask R-CNN on one image: float32 (3, H, W) in [0, 1] -> boxes (N, 4) XYXY,
    labels (N,), scores (N,), masks (N, 1, H, W) pasted probabilities (its own resize inside)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model([image])[0]
        return out["boxes"], out["labels"], out["scores"], out["masks"]


def build_graph(family: str, model: nn.Module, task: Any) -> nn.Module:
    """The module that is exported for `family` (eval mode)."""
    if family == "instance":
        return DetectorGraph(model).eval()
    keys = {"semantic": ("out",), "mask2former": ("pred_logits", "pred_masks")}[family]
    return PixelGraph(model, task.mean, task.std, keys).eval()


def write_graph(graph: nn.Module, family: str, fmt: str, example: torch.Tensor, path: Path,
                metadata: dict[str, Any], dynamic_size: bool = True, opset: int = OPSET) -> None:
    """Export `graph` traced on `example` (semantic/Mask2Former: a batch of 2; instance: one
    image) to `path` in `fmt` with `metadata` embedded. Batch (where there is one) and image
    size are dynamic, unless `dynamic_size` is False: then the graph takes the example's shape
    only (pass a batch of 1), and the metadata records its size as `fixed_size`. Exceptions of
    the exporters pass through."""
    fixed = None if dynamic_size else [int(v) for v in example.shape[-2:]]
    metadata = {**metadata, "fixed_size": fixed}
    # The exporters print whole graphs to stderr when they fail; the exception says enough.
    with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")  # tracer warnings about Python values are expected
        if fmt == "onnx":
            _write_onnx(graph, family, example, path, opset, dynamic_size=fixed is None)
            _embed_onnx_metadata(path, metadata)
            return
        extra = {METADATA_KEY: json.dumps(metadata)}
        if fmt == "torchscript":
            if family == "instance":  # torchvision's detectors are scriptable (control flow kept)
                module = torch.jit.script(graph.model)
            else:  # a trace: sizes the model computes in Python may be baked in (the parity check tells)
                module = torch.jit.trace(graph, (example,), check_trace=False)
            torch.jit.save(module, str(path), _extra_files=extra)
            return
        if fmt == "exported_program":
            auto = torch.export.Dim.AUTO
            if fixed is not None:
                dims = {}
            elif family == "instance":
                dims = {1: auto, 2: auto}
            else:
                dims = {0: auto, 2: auto, 3: auto}
            program = torch.export.export(graph, (example,), dynamic_shapes=(dims,))
            torch.export.save(program, str(path), extra_files=extra)
            return
    raise ValueError(f"format={fmt!r}; expected one of {', '.join(FORMATS)}")


def _write_onnx(graph: nn.Module, family: str, example: torch.Tensor, path: Path, opset: int,
                dynamic_size: bool) -> None:
    names = OUTPUT_NAMES[family]
    if family == "instance":
        size = {1: "height", 2: "width"} if dynamic_size else {}
        axes = {"image": size, **{name: {0: "detections"} for name in names}}
        axes["masks"] = {0: "detections", **({2: "height", 3: "width"} if dynamic_size else {})}
        inputs = ["image"]
    else:
        # A fixed size is fixed batch 1 too: with a dynamic batch the exporter loses the spatial
        # sizes that ops such as adaptive pooling need.
        axes = {}
        if dynamic_size:
            axes = {"images": {0: "batch", 2: "height", 3: "width"}, **{name: {0: "batch"} for name in names}}
            if family == "semantic":
                axes["logits"] = {0: "batch", 2: "height", 3: "width"}
            else:
                axes["pred_masks"] = {0: "batch", 2: "mask_height", 3: "mask_width"}
        inputs = ["images"]
    # The TorchScript-based exporter (dynamo=False): it handles torchvision's detectors (their
    # ONNX-specific code paths) and needs no onnxscript.
    torch.onnx.export(graph, (example,), str(path), dynamo=False, opset_version=opset,
                      input_names=inputs, output_names=list(names), dynamic_axes=axes,
                      do_constant_folding=True)


def _embed_onnx_metadata(path: Path, metadata: dict[str, Any]) -> None:
    """Store `metadata` as JSON under the ONNX model's metadata_props[METADATA_KEY]."""
    import onnx

    model = onnx.load(str(path))
    del model.metadata_props[:]
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(metadata)
    onnx.save(model, str(path))
