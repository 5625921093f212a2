"""`segtrain export`: a checkpoint's network written as ONNX, TorchScript or a torch.export program,
checked against the eager model on real images before the file is put in place.

Only `export(cfg)` sees the config. The file is written under a temporary name beside `output`,
loaded back, run on the parity images, and renamed to `output` only when every figure is within
tolerance; a failed export or check leaves nothing behind.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from segtrain import __version__
from segtrain.exporting.graphs import (
    FORMATS,
    METADATA_VERSION,
    OUTPUT_NAMES,
    SUFFIXES,
    ExportError,
    build_graph,
    family_of,
    write_graph,
)
from segtrain.exporting.parity import ParityCheck, Tolerances
from segtrain.exporting.runtime import (
    ExportedModel,
    MissingExtraError,
    exported_format,
    import_onnxruntime,
    onnx_runner,
    torch_runner,
)

log = logging.getLogger("segtrain.export")

# Keys of export.yaml itself: every other override edits the checkpoint's config.
EXPORT_KEYS = frozenset({"ckpt", "format", "output", "input", "num_images", "batch_size", "atol",
                         "box_atol", "min_agreement", "opset", "dynamic_size", "overwrite", "use_ema",
                         "trust"})


def export(cfg: DictConfig) -> dict[str, Any]:
    """Export the model of `cfg.ckpt` to `cfg.output` in `cfg.format`, after a parity check.

    Returns the report (also printed, and written as export.json in the run directory).
    Raises ExportError (a ValueError) when the model cannot be exported in that format or the
    exported graph differs from the eager model beyond the tolerances.
    """
    from segtrain.model_loading import load_model_from_checkpoint

    fmt, output, tol = _check_options(cfg)
    loaded = load_model_from_checkpoint(cfg.ckpt, cfg, _overrides(), lambda run_cfg: torch.device("cpu"),
                                        use_ema=bool(cfg.use_ema), own_keys=EXPORT_KEYS)
    family = family_of(loaded.task)
    model_name = _model_name(loaded.run_cfg)
    samples = _parity_samples(cfg, loaded.run_cfg)
    graph = build_graph(family, loaded.model, loaded.task)
    example = _example(family, loaded.task, samples[0])
    metadata = {
        "metadata_version": METADATA_VERSION, "segtrain_version": __version__, "format": fmt,
        "family": family, "model": model_name, "checkpoint": Path(str(cfg.ckpt)).name,
        "input": _input_doc(family), "outputs": list(OUTPUT_NAMES[family]),
        "normalization": None if family == "instance" else {
            "mean": loaded.task.mean.flatten().tolist(), "std": loaded.task.std.flatten().tolist()},
        "meta": loaded.meta.to_dict(), "config": OmegaConf.to_yaml(loaded.run_cfg),
    }
    tmp = output.with_name(f".{output.stem}.{os.getpid()}.tmp{output.suffix}")
    size = tuple(example.shape[-2:])
    at_size = [tuple(_example(family, loaded.task, s).shape[-2:]) == size for s in samples]
    traced = [s for s, same in zip(samples, at_size) if same]
    others = [s for s, same in zip(samples, at_size) if not same]
    dynamic = _dynamic_mode(cfg) != "false"
    note = ""
    try:
        start = time.perf_counter()
        try:
            exported = _export_file(graph, family, fmt, example, tmp, metadata, dynamic, cfg, model_name)
        except ExportError as err:
            if not dynamic or _dynamic_mode(cfg) == "true":
                raise
            # e.g. ONNX has no adaptive pooling over a dynamic size (PSPNet's pyramid pooling)
            note = _fixed_size_note(size, "the export with a dynamic size failed "
                                          f"({str(err).split(': ', 1)[-1]})")
            dynamic = False
            exported = _export_file(graph, family, fmt, example, tmp, metadata, dynamic, cfg, model_name)
        seconds = time.perf_counter() - start
        check = _traced_parity(graph, exported, loaded, family, traced, cfg, tol, model_name)
        if dynamic and others and not check.failures():
            problem = _other_sizes_problem(graph, exported, loaded, family, others, cfg, tol, check)
            if problem and _dynamic_mode(cfg) == "true":
                raise ExportError(f"model {model_name} as format={fmt}: the graph does not keep the image "
                                  f"size dynamic: {problem}; {output} was not written")
            if problem:
                note = _fixed_size_note(size, "with a dynamic size the graph differs from eager at other "
                                              f"sizes ({problem}); dynamic_size=true makes this an error")
                dynamic = False
                exported = _export_file(graph, family, fmt, example, tmp, metadata, False, cfg, model_name)
                check = _traced_parity(graph, exported, loaded, family, traced, cfg, tol, model_name)
        checked = len(traced) + (len(others) if dynamic else 0)
        print(f"export {model_name} -> {output} (format={fmt}, {seconds:.1f} s, image size "
              f"{'dynamic' if dynamic else list(size)})\nparity against the eager model on {checked} "
              f"images ({len(others) if dynamic else 0} at sizes other than the traced {list(size)}):\n"
              f"{check.table()}{note}")
        failed = check.failures()
        if failed:
            worst = failed[0]
            raise ExportError(
                f"parity check failed: {model_name} as format={fmt}: {worst.name} = {worst.value:.4g} "
                f"({worst.where}); the limit is {'<=' if worst.at_most else '>='} {worst.limit:g} "
                f"({len(failed)} figure(s) out of tolerance, table above); {output} was not written")
        os.replace(tmp, output)
    finally:
        tmp.unlink(missing_ok=True)
    report = {"output": str(output), "format": fmt, "family": family, "model": model_name,
              "fixed_size": None if dynamic else list(size), "export_seconds": round(seconds, 3),
              "parity": check.as_dict()}
    hydra_dir = OmegaConf.select(HydraConfig.get(), "runtime.output_dir", default=None) \
        if HydraConfig.initialized() else None
    run_dir = Path(hydra_dir) if hydra_dir else output.parent
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "export.json").write_text(json.dumps(report, indent=2) + "\n")
    log.info("wrote %s", output)
    return report


def _export_file(graph: torch.nn.Module, family: str, fmt: str, example: torch.Tensor, path: Path,
                 metadata: dict[str, Any], dynamic: bool, cfg: DictConfig, model_name: str) -> ExportedModel:
    """Write the graph to `path` and load it back as an ExportedModel; ExportError when either fails."""
    if not dynamic and family != "instance":
        example = example[:1]  # fixed: one image of one size per call (ExportedModel loops)
    try:
        write_graph(graph, family, fmt, example, path, metadata, dynamic, int(cfg.opset))
    except Exception as err:  # noqa: BLE001 - every exporter failure means the same to the user
        raise ExportError(f"model {model_name} cannot be exported as format={fmt}: "
                          f"{_first_line(err)}") from err
    fixed = None if dynamic else tuple(example.shape[-2:])
    return ExportedModel(_load_back(path, fmt, family, model_name), family, fixed, str(cfg.output or path))


def _traced_parity(graph: torch.nn.Module, exported: ExportedModel, loaded: Any, family: str, traced: list,
                   cfg: DictConfig, tol: Tolerances, model_name: str) -> ParityCheck:
    """Parity on the images of the traced size; ExportError when the runtime cannot run them."""
    try:
        return run_parity(graph, exported, loaded, family, traced, int(cfg.batch_size), tol)
    except (ValueError, RuntimeError) as err:  # onnxruntime's errors derive from RuntimeError
        raise ExportError(f"model {model_name} exported as format={cfg.format} does not run on the parity "
                          f"images: {_first_line(err)}") from err


def _other_sizes_problem(graph: torch.nn.Module, exported: ExportedModel, loaded: Any, family: str,
                         others: list, cfg: DictConfig, tol: Tolerances, check: ParityCheck) -> str | None:
    """Parity on the images of other sizes than the traced one: None when it passes (its figures
    are added to `check`), else what went wrong."""
    try:
        other = run_parity(graph, exported, loaded, family, others, int(cfg.batch_size), tol)
    except Exception as err:  # noqa: BLE001 - a runtime refusing another size is the finding
        return f"running it on {', '.join(str(t['file_name']) for _, t in others)} fails: {_first_line(err)}"
    failed = other.failures()
    if failed:
        return f"{failed[0].name} = {failed[0].value:.4g} ({failed[0].where})"
    check.absorb(other)
    return None


def run_parity(graph: torch.nn.Module, exported: ExportedModel, loaded: Any, family: str,
               samples: list[tuple[torch.Tensor, dict]], batch_size: int, tol: Tolerances) -> ParityCheck:
    """Compare `exported` with the eager `graph` (raw outputs) and the eager task's predictions
    with those of the same task's code around the export, batch by batch."""
    export_task = _export_task(loaded, family)
    check = ParityCheck(tol)
    for first in range(0, len(samples), batch_size):
        chunk = samples[first:first + batch_size]
        where = "images " + ",".join(str(t["file_name"]) for _, t in chunk)
        batch = loaded.task.collate(chunk)
        with torch.no_grad():
            if family == "instance":
                for image, target in chunk:
                    x = image.float() / 255.0
                    check.compare_detections(graph(x), exported.outputs(x), f"image {target['file_name']}")
            else:
                x = batch["images"].float()
                check.compare_raw(OUTPUT_NAMES[family], graph(x), exported.outputs(x), where)
            eager = loaded.task.predict(loaded.model, batch)
            ours = export_task.predict(exported, export_task.collate(chunk))
        for (_, target), a, b in zip(chunk, eager, ours):
            check.compare_predictions(a, b, f"image {target['file_name']}")
    return check


def _export_task(loaded: Any, family: str) -> Any:
    """The task as `segtrain predict` builds it around an export: the graph normalises, so a
    semantic or Mask2Former task hands it pixel values (mean 0, std 1)."""
    from segtrain.builders import build_task

    if family == "instance":
        return loaded.task
    run_cfg = loaded.run_cfg.copy()
    with open_dict(run_cfg):
        run_cfg.task.mean, run_cfg.task.std = [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]
    return build_task(run_cfg, loaded.meta, with_loss=False)


def _load_back(path: Path, fmt: str, family: str, model_name: str) -> Any:
    """A runner over the file just written; ExportError when the runtime cannot load or run it."""
    try:
        if fmt == "onnx":
            return onnx_runner(path)[0]
        return torch_runner(path, fmt, family)
    except ImportError:
        raise
    except Exception as err:  # noqa: BLE001 - the runtime refusing the graph is the export's failure
        raise ExportError(f"model {model_name} exported as format={fmt} does not load in its runtime: "
                          f"{_first_line(err)}") from err


def _parity_samples(cfg: DictConfig, run_cfg: DictConfig) -> list[tuple[torch.Tensor, dict]]:
    """The images of the check: `input=` (the first num_images) or the run's validation set's first
    num_images, plus the first one resized to about 1.25 x its height and 1.5 x its width, odd
    sizes (what a graph that baked in the traced size, or a padding, gets wrong). Targets:
    image_id, orig_size, file_name only."""
    count = int(cfg.num_images)
    images: list[tuple[torch.Tensor, str]] = []
    if cfg.input is not None:
        from segtrain.inference.images import ImageFiles, Unreadable, list_images

        files = ImageFiles(list_images(cfg.input)[:count])
        for i in range(len(files)):
            item = files[i]
            if isinstance(item, Unreadable):
                raise ValueError(f"input={cfg.input}: {item.path} does not decode: {item.error}")
            images.append((item[0], Path(item[2]).stem))
    else:
        node = run_cfg.dataset.get("val") or run_cfg.dataset.get("train")
        try:
            dataset = instantiate(node)
        except (OSError, ValueError) as err:
            raise ValueError(f"the parity check reads the run's validation images, which cannot be read "
                             f"here: {err}. Pass dataset.root=... or input=DIR with a few images") from err
        for i in range(min(count, len(dataset))):
            images.append((dataset[i][0], f"val{i}"))
    if not images:
        raise ValueError("no images for the parity check; pass input=DIR or num_images >= 1")
    first = images[0][0].as_subclass(torch.Tensor)
    h, w = first.shape[-2:]
    resized = torch.nn.functional.interpolate(first[None].float(), size=(h + h // 4 + 1, w + w // 2 + 3),
                                              mode="bilinear", align_corners=False)[0]
    images.append((resized.round().clamp(0, 255).to(torch.uint8), f"{images[0][1]}_resized"))
    return [(image.as_subclass(torch.Tensor), {"image_id": i, "file_name": name,
                                                "orig_size": torch.tensor(image.shape[-2:])})
            for i, (image, name) in enumerate(images)]


def _example(family: str, task: Any, sample: tuple[torch.Tensor, dict]) -> torch.Tensor:
    """The input the graph is traced on: one image (instance, float [0, 1]) or the task's batch of
    the first image twice (pixel values; batch 2, so that the batch size is not specialised to 1)."""
    if family == "instance":
        return sample[0].float() / 255.0
    return task.collate([sample, sample])["images"].float()


def _input_doc(family: str) -> dict[str, Any]:
    if family == "instance":
        return {"name": "image", "shape": ["3", "height", "width"], "dtype": "float32",
                "values": "RGB in [0, 1]; one image per call (the graph resizes it itself)"}
    return {"name": "images", "shape": ["batch", "3", "height", "width"], "dtype": "float32",
            "values": "RGB pixel values 0..255 (normalisation is inside the graph)",
            "padding": "bottom/right with 0 to a common size, as the task's collate pads"}


def _model_name(run_cfg: DictConfig) -> str:
    backbone = OmegaConf.select(run_cfg, "model.backbone")
    return str(run_cfg.model._target_).rsplit(".", 1)[-1] + (f"(backbone={backbone})" if backbone else "")


def _overrides() -> list[str]:
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def _dynamic_mode(cfg: DictConfig) -> str:
    """dynamic_size as auto | true | false (YAML reads true/false as booleans)."""
    value = cfg.dynamic_size
    return str(value).lower() if isinstance(value, bool) else str(value)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"[:400]


def _fixed_size_note(size: tuple[int, ...], why: str) -> str:
    """Log and return the warning that the export keeps only the traced image size, and why."""
    note = (f"\nWARNING: fixed image size {list(size)}: {why}; the exported graph takes only images "
            f"that collate to {list(size)}")
    log.warning(note.strip())
    return note


def _check_options(cfg: DictConfig) -> tuple[str, Path, Tolerances]:
    """Clear errors for export's own keys, before anything is loaded."""
    fmt = str(cfg.format)
    if fmt not in FORMATS:
        raise ValueError(f"format={fmt}; expected one of {', '.join(FORMATS)}")
    ckpt = Path(str(cfg.ckpt))
    if not ckpt.is_file():
        raise FileNotFoundError(f"ckpt={ckpt}: checkpoint file not found")
    if exported_format(ckpt) is not None:
        raise ValueError(f"ckpt={ckpt} is already an exported model; export reads segtrain checkpoints (.pt)")
    output = Path(str(cfg.output)) if cfg.output is not None else ckpt.with_suffix(SUFFIXES[fmt][0])
    if output.suffix.lower() not in SUFFIXES[fmt]:
        raise ValueError(f"output={output}: a format={fmt} file ends in {' or '.join(SUFFIXES[fmt])}")
    if output.exists() and not bool(cfg.overwrite):
        raise FileExistsError(f"output={output} already exists; pass overwrite=true to replace it, or "
                              "choose another output=")
    if _dynamic_mode(cfg) not in ("auto", "true", "false"):
        raise ValueError(f"dynamic_size={cfg.dynamic_size}; expected auto, true or false")
    if int(cfg.num_images) < 1 or int(cfg.batch_size) < 1:
        raise ValueError(f"num_images={cfg.num_images}, batch_size={cfg.batch_size}: expected integers >= 1")
    tol = Tolerances(float(cfg.atol), float(cfg.box_atol), float(cfg.min_agreement))
    if min(tol.atol, tol.box_atol) < 0 or not 0.0 <= tol.min_agreement <= 1.0:
        raise ValueError(f"atol={tol.atol}, box_atol={tol.box_atol}, min_agreement={tol.min_agreement}: "
                         "expected tolerances >= 0 and an agreement in [0, 1]")
    if fmt == "onnx":
        try:
            import onnx  # noqa: F401 - the export writes its metadata with it
        except ImportError as err:
            raise MissingExtraError("format=onnx needs onnx and onnxruntime: "
                                    "pip install 'segtrain[export]'") from err
        import_onnxruntime()
    output.parent.mkdir(parents=True, exist_ok=True)
    return fmt, output, tol
