"""`segtrain eval`: a checkpoint on its run's validation data."""

from __future__ import annotations

import logging
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig

from segtrain.builders import loader_options
from segtrain.data.loader import build_eval_loader
from segtrain.engine.evaluation import evaluate_model
from segtrain.engine.trainer_config import resolve_device
from segtrain.inference.tta import tta_options, with_tta
from segtrain.metrics.report import report
from segtrain.model_loading import load_model_from_checkpoint
from segtrain.utils.distributed import is_main_process, join_launched_group

log = logging.getLogger("segtrain.eval")
PREDICTIONS_DIR = "predictions"  # save_predictions=true writes under the output directory


def evaluate(cfg: DictConfig) -> dict:
    """Rebuild model and validation data from the checkpoint alone; report and save metrics.

    With `save_predictions=true` the predictions are also written as `segtrain predict` writes
    them (label PNGs, COCO results, COCO panoptic, overlays) to `<output>/predictions/`.
    """
    join_launched_group()
    ckpt_path = Path(cfg.ckpt)
    tta = tta_options(cfg.get("tta"))  # a bad value fails before the checkpoint is read
    loaded = load_model_from_checkpoint(
        ckpt_path, cfg, HydraConfig.get().overrides.task,
        device=lambda run_cfg: resolve_device(run_cfg.trainer.device), use_ema=bool(cfg.use_ema))
    run_cfg, task = loaded.run_cfg, with_tta(loaded.task, tta)
    val_set = instantiate(run_cfg.dataset.val)
    output = Path(cfg.output) if cfg.output else Path(HydraConfig.get().runtime.output_dir)
    metrics_path = output if output.suffix == ".json" else output / "metrics.json"
    consumers = []
    writer = None
    if cfg.save_predictions:
        from segtrain.inference.writers import PredictionWriter  # only when asked: PIL drawing

        writer = PredictionWriter(metrics_path.parent / PREDICTIONS_DIR, loaded.meta, overlay=True)
        consumers.append(lambda batch, predictions: writer.write(task.images(batch), batch["targets"],
                                                                 predictions))
    loader = build_eval_loader(val_set, run_cfg.data.val_batch_size, task.collate,
                               loader_options(run_cfg, loaded.device))
    log.info("evaluating %s on %d images (device %s)", ckpt_path, len(val_set), loaded.device)
    # Under torchrun each rank evaluates its share of the data; every rank gets the output
    # directory (per-image files are written by their rank, whole-set files by rank 0).
    try:
        metrics, _ = evaluate_model(
            loaded.model, task, loader, task.build_evaluator(metrics_path.parent), loaded.device,
            run_cfg.trainer.precision, progress=None if is_main_process() else False, consumers=consumers,
        )
    except BaseException:
        if writer is not None:
            writer.abort()  # stop its write thread; the files written so far stay
        raise
    if writer is not None:
        writer.close()  # on every rank: the JSON records are gathered
        log.info("predictions written to %s", metrics_path.parent / PREDICTIONS_DIR)
    if is_main_process():  # every rank holds the same reduced metrics
        report(metrics, metrics_path)
    return metrics

