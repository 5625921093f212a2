"""Exported files run in place of the eager model: an `ExportedModel` is called as the family's
task calls its model, so the task's pre- and post-processing (and `predict`'s writers) are the
same code for a checkpoint and for its export.

`segtrain predict` runs ONNX files only: an ONNX file is data (a graph of standard operators
with weights), while loading TorchScript or a torch.export program deserialises code, which the
checkpoint security contract does not allow for files from elsewhere.
"""

from __future__ import annotations

import json
import warnings
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, open_dict

from segtrain.exporting.graphs import FAMILIES, METADATA_KEY, METADATA_VERSION, OUTPUT_NAMES, SUFFIXES

INSTALL_HINT = "pip install 'segtrain[export]' (onnx and onnxruntime)"
Runner = Callable[[torch.Tensor], tuple[torch.Tensor, ...]]


class MissingExtraError(ImportError, ValueError):
    """An optional dependency is missing (a ValueError too, so the command line shows one line)."""


def import_onnxruntime() -> Any:
    """The onnxruntime module; ImportError naming the extra that installs it."""
    try:
        import onnxruntime
    except ImportError as err:
        raise MissingExtraError(f"ONNX Runtime is not installed: {INSTALL_HINT}") from err
    return onnxruntime


class ExportedModel:
    """An exported graph called as the eager model is called by its task.

    semantic: images float (N, 3, H, W) pixel values 0..255 -> {"out": logits (N, C, H, W)};
    mask2former: the same images -> {"pred_logits", "pred_masks"}; instance: a list of float
    (3, H, W) images in [0, 1] -> per image {"boxes", "labels", "scores", "masks"} (one call of
    the graph per image). A fixed-size export takes one image per call: batches are split.
    Outputs come back on the inputs' device.
    """

    def __init__(self, run: Runner, family: str, fixed_size: Sequence[int] | None = None,
                 source: str = "the exported model") -> None:
        self.run, self.family, self.source = run, family, source
        self.fixed_size = None if fixed_size is None else tuple(int(v) for v in fixed_size)
        self.training = False

    def eval(self) -> ExportedModel:
        return self

    def __call__(self, inputs: Any) -> Any:
        if self.family == "instance":
            return [dict(zip(OUTPUT_NAMES["instance"], self.outputs(image))) for image in inputs]
        outputs = self.outputs(inputs)
        if self.family == "semantic":
            return {"out": outputs[0]}
        return dict(zip(OUTPUT_NAMES["mask2former"], outputs))

    def outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The graph's raw outputs for one input (a batch; instance: one image), as a tuple."""
        if self.fixed_size is not None and tuple(x.shape[-2:]) != self.fixed_size:
            raise ValueError(f"{self.source} was exported with a fixed image size {list(self.fixed_size)} "
                             f"(the model does not allow a dynamic one), but got an image batch of "
                             f"{list(x.shape[-2:])}; resize the images or export from a model "
                             "that keeps the size dynamic")
        if self.fixed_size is not None and self.family != "instance" and len(x) > 1:
            # A fixed-size graph takes one image per call.
            parts = [self.run(image[None].float()) for image in x]
            return tuple(torch.cat(outs).to(x.device) for outs in zip(*parts))
        return tuple(out.to(x.device) for out in self.run(x.float()))


def onnx_runner(path: Path, device: torch.device | None = None) -> tuple[Runner, dict[str, Any]]:
    """(a runner over an ONNX Runtime session of `path`, its segtrain metadata). The CUDA
    execution provider when `device` is CUDA and onnxruntime has it, else the CPU one; the CPU
    provider uses torch's thread count."""
    ort = import_onnxruntime()
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.log_severity_level = 4  # errors reach the caller as exceptions; no second copy on stderr
    providers = ["CPUExecutionProvider"]
    cuda = device is not None and device.type == "cuda"
    if cuda and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    session = ort.InferenceSession(str(path), options, providers=providers)
    metadata = read_metadata_map(session.get_modelmeta().custom_metadata_map, path)
    input_name = session.get_inputs()[0].name

    def run(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        array = x.detach().cpu().contiguous().numpy()
        return tuple(torch.from_numpy(out) for out in session.run(None, {input_name: array}))

    return run, metadata


def torch_runner(path: Path, fmt: str, family: str) -> Runner:
    """A runner over a TorchScript or torch.export file segtrain just wrote (its own file: these
    formats deserialise code, so `predict` does not load them from elsewhere)."""
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
            module = torch.jit.load(str(path), map_location="cpu").eval()
        if family == "instance":  # the scripted detector itself: (losses, detections) per list
            def run_detector(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
                with torch.no_grad():
                    out = module([x])[1][0]
                return tuple(out[name] for name in OUTPUT_NAMES["instance"])

            return run_detector
    else:
        module = torch.export.load(str(path)).module()

    def run(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        with torch.no_grad():
            return tuple(module(x))

    return run


def read_metadata_map(props: dict[str, str], path: Path) -> dict[str, Any]:
    """The segtrain metadata of an exported file from its key -> text map; ValueError when the
    file was not written by `segtrain export`."""
    if METADATA_KEY not in props:
        raise ValueError(f"{path} has no segtrain metadata (metadata_props[{METADATA_KEY!r}]): "
                         "segtrain predict runs ONNX files written by `segtrain export`")
    try:
        metadata = json.loads(props[METADATA_KEY])
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: its segtrain metadata is not valid JSON ({err})") from err
    version = metadata.get("metadata_version") if isinstance(metadata, dict) else None
    if version != METADATA_VERSION or metadata.get("family") not in FAMILIES.values():
        raise ValueError(f"{path}: segtrain metadata version {version!r} / family "
                         f"{metadata.get('family') if isinstance(metadata, dict) else None!r} is "
                         f"not one this segtrain reads (version {METADATA_VERSION})")
    return metadata


def exported_format(path: str | Path) -> str | None:
    """"onnx" for a .onnx file; "torchscript" / "exported_program" for those formats (by suffix, or
    a TorchScript archive's `code/` folder); None for anything else (a segtrain checkpoint)."""
    path = Path(path)
    suffix = path.suffix.lower()
    for fmt, suffixes in SUFFIXES.items():
        if suffix in suffixes and fmt != "torchscript":
            return fmt
    if suffix in (".ts", ".torchscript"):
        return "torchscript"
    if path.is_file() and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            if any(name.split("/")[1:2] == ["code"] for name in archive.namelist()):
                return "torchscript"
    return None


def check_predictable(path: str | Path) -> None:
    """ValueError for an exported file `segtrain predict` refuses to run (not ONNX)."""
    fmt = exported_format(path)
    if fmt in ("torchscript", "exported_program"):
        raise ValueError(
            f"ckpt={path} is a {fmt} file; segtrain predict runs segtrain checkpoints (.pt) and ONNX "
            "exports (.onnx) only: loading TorchScript or a torch.export program runs serialized "
            "code, which segtrain does not do for a file (checkpoints are data). Export to ONNX "
            "(segtrain export ckpt=... format=onnx) or load the file with torch.jit.load / "
            "torch.export.load in code of your own if you trust it")


def load_exported_model(path: str | Path, composed: DictConfig, overrides: Sequence[str],
                        device: Callable[[DictConfig], torch.device], use_ema: bool = False,
                        own_keys: frozenset[str] = frozenset()) -> Any:
    """A `LoadedModel` for an ONNX export: the graph in ONNX Runtime as the model, the task
    rebuilt from the run config the file's metadata holds (checked as a checkpoint's is, with
    the command line's values on top), the class metadata; no checkpoint, no pickle."""
    from segtrain.builders import build_task
    from segtrain.config_check import check_config
    from segtrain.data.meta import DatasetMeta
    from segtrain.eval_config import build_eval_config
    from segtrain.model_loading import LoadedModel

    path = Path(path)
    check_predictable(path)
    if use_ema:
        raise ValueError(f"use_ema=true does not apply to {path}: an export holds the weights chosen "
                         "when it was exported (segtrain export ... use_ema=true)")
    import_onnxruntime()  # the clear "pip install" error before anything else
    try:
        run, metadata = onnx_runner(path, None)
    except RuntimeError as err:  # onnxruntime's Fail, InvalidGraph, ... derive from it
        raise ValueError(f"cannot load {path} with ONNX Runtime: {err}") from err
    run_cfg = build_eval_config(metadata["config"], composed, overrides, f"export {path}",
                                own_keys=own_keys)
    check_config(run_cfg)
    target = device(run_cfg)
    with open_dict(run_cfg):
        run_cfg.trainer.precision = "fp32"  # the exported graph is float32
        if metadata["family"] != "instance":  # the graph normalises: the task hands it pixel values
            run_cfg.task.mean, run_cfg.task.std = [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]
    if target.type == "cuda":
        run, _ = onnx_runner(path, target)
    meta = DatasetMeta.from_dict(metadata["meta"])
    model = ExportedModel(run, metadata["family"], metadata.get("fixed_size"), str(path))
    return LoadedModel(model, build_task(run_cfg, meta, with_loss=False), meta, run_cfg, target)
