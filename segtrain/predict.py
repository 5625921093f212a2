"""`segtrain predict`: a trained checkpoint on new images, written as prediction files.

Only this module sees the config: it lists the images, rebuilds the model from the checkpoint,
and runs the loop (decode in workers -> the model family's collate and predict -> the writer).
Under torchrun each rank predicts a contiguous share of the images; the outputs equal a
one-process run's.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from segtrain.data.loader import LoaderOptions, build_eval_loader, shutdown_workers
from segtrain.engine.evaluation import DTYPES, autocast_context
from segtrain.engine.trainer_config import resolve_device
from segtrain.exporting.runtime import exported_format, load_exported_model
from segtrain.inference.images import ImageFiles, SkippingCollate, Unreadable, list_images
from segtrain.inference.tta import tta_options, with_tta
from segtrain.inference.writers import PredictionWriter, check_output_dir
from segtrain.model_loading import load_model_from_checkpoint
from segtrain.utils.distributed import is_main_process, join_launched_group

log = logging.getLogger("segtrain.predict")

# Keys of predict.yaml itself: every other override edits the checkpoint's config.
PREDICT_KEYS = frozenset({"ckpt", "input", "output", "batch_size", "num_workers", "device",
                          "precision", "overlay", "score_thresh", "overwrite", "exif", "use_ema",
                          "trust", "tta"})


def predict(cfg: DictConfig) -> dict[str, Any]:
    """Predict every image of `cfg.input` with the model of `cfg.ckpt`; write to `cfg.output`.

    Returns {"images", "detections", "skipped", "seconds"} (counts over all ranks).
    """
    join_launched_group()
    _check_options(cfg)
    tta = tta_options(cfg.get("tta"))
    if tta.enabled and exported_format(cfg.ckpt):  # TTA drives the PyTorch model's own parts
        raise ValueError(f"tta (flip={tta.flip}, scales={list(tta.scales)}) runs on a PyTorch checkpoint "
                         f"(.pt), and ckpt={cfg.ckpt} is an export; pass the run's .pt or tta=none")
    paths = list_images(cfg.input)  # inputs and output are checked before the model is loaded
    check_output_dir(cfg.output, bool(cfg.overwrite))
    # An ONNX export runs in ONNX Runtime inside the same task code and writers (segtrain.exporting).
    load = load_exported_model if exported_format(cfg.ckpt) else load_model_from_checkpoint
    loaded = load(
        cfg.ckpt, cfg, HydraConfig.get().overrides.task, lambda run_cfg: resolve_device(str(cfg.device)),
        use_ema=bool(cfg.use_ema), own_keys=PREDICT_KEYS,
    )
    precision = str(cfg.precision or loaded.run_cfg.trainer.precision)
    device = loaded.device
    loader = build_eval_loader(
        ImageFiles(paths, exif_orientation=bool(cfg.exif)), int(cfg.batch_size),
        SkippingCollate(loaded.task.collate, keep_images=bool(cfg.overlay)),
        LoaderOptions(num_workers=int(cfg.num_workers), pin_memory=device.type == "cuda"),
    )
    writer = PredictionWriter(cfg.output, loaded.meta, overlay=bool(cfg.overlay),
                              score_thresh=float(cfg.score_thresh), overwrite=bool(cfg.overwrite))
    log.info("predicting %d images with %s (device %s, %s)", len(paths), cfg.ckpt, device, precision)
    start = time.perf_counter()
    skipped = predict_images(loaded.model, with_tta(loaded.task, tta), loader, writer, device, precision)
    summary = {**writer.close([f"{s.path}\t{s.error}" for s in skipped]),
               "seconds": round(time.perf_counter() - start, 3)}
    if is_main_process():
        rate = summary["images"] / max(summary["seconds"], 1e-9)
        log.info("predicted %d images in %.3f s (%.1f images/s) into %s", summary["images"],
                 summary["seconds"], rate, cfg.output)
        if summary["skipped"]:
            log.warning("skipped %d files that do not decode (listed in %s/skipped.txt)",
                        summary["skipped"], cfg.output)
    return summary


def _check_options(cfg: DictConfig) -> None:
    """Clear errors for bad values of predict's own keys, before anything is read."""
    if not Path(str(cfg.ckpt)).is_file():
        raise FileNotFoundError(f"ckpt={cfg.ckpt}: checkpoint file not found")
    if int(cfg.batch_size) < 1:
        raise ValueError(f"batch_size={cfg.batch_size}; expected an integer >= 1")
    if int(cfg.num_workers) < 0:
        raise ValueError(f"num_workers={cfg.num_workers}; expected an integer >= 0 (0: decode in "
                         "the main process)")
    if cfg.precision is not None and cfg.precision not in ("fp32", *DTYPES):
        raise ValueError(f"precision={cfg.precision}; expected fp32, bf16 or fp16 (or null: the run's)")
    if not 0.0 <= float(cfg.score_thresh) <= 1.0:
        raise ValueError(f"score_thresh={cfg.score_thresh}; expected a score in [0, 1]")


@torch.no_grad()
def predict_images(model: nn.Module, task: Any, loader: DataLoader, writer: PredictionWriter,
                   device: torch.device, precision: str = "fp32",
                   progress: bool | None = None) -> Sequence[Unreadable]:
    """Run `model` over the `PredictBatch`es of `loader`, handing predictions to `writer`;
    returns the files that did not decode (each logged as it is met). progress: a tqdm bar with
    images/s and ETA (None: on the main process when the console is a terminal)."""
    model.eval()
    skipped: list[Unreadable] = []
    disable = (None if is_main_process() else True) if progress is None else not progress
    bar = tqdm(total=len(loader.sampler), unit="img", desc="predict", disable=disable, leave=False)
    batches = iter(loader)
    try:
        for item in batches:
            for bad in item.skipped:
                log.warning("skipping %s: %s", bad.path, bad.error)
            skipped += item.skipped
            if item.batch is not None:
                batch = task.to_device(item.batch, device)
                with autocast_context(device, precision):
                    predictions = task.predict(model, batch)
                writer.write(item.images, item.targets, predictions)
            bar.update(len(item.targets) + len(item.skipped))
        return skipped
    except BaseException:
        shutdown_workers(loader, batches)  # the traceback keeps `batches`, and its workers, alive
        writer.abort()
        raise
    finally:
        bar.close()
