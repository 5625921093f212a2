"""`segtrain score`: prediction files against ground truth, no model.

Imports stay light (no torch for instance/LVIS/panoptic scoring): the command's start-up is part of its
speed, and a plain pycocotools script is what it is compared with.
"""

from __future__ import annotations

from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from segtrain.metrics.report import report

SCORE_TASKS = ("semantic", "instance", "lvis", "panoptic")


def score(cfg: DictConfig) -> dict:
    """Score prediction files against ground truth in the dataset's standard format."""
    # `task=` picks an option of the task group (so Hydra lists the valid ones on a typo);
    # the scorer goes by the option's name, not by the training-time task object it holds.
    task = HydraConfig.get().runtime.choices["task"]
    if task not in SCORE_TASKS:
        raise ValueError(f"score task={task!r}; valid tasks: {', '.join(SCORE_TASKS)}")
    output = Path(cfg.output) if cfg.output else Path(HydraConfig.get().runtime.output_dir)
    metrics_path = output if output.suffix == ".json" else output / "metrics.json"
    if task == "semantic":
        from segtrain.metrics.semantic import score_semantic_dirs

        if cfg.num_classes is None:
            raise ValueError("score task=semantic needs num_classes=N (the number of classes)")
        class_names = list(cfg.class_names) if cfg.class_names is not None else None
        metrics = score_semantic_dirs(
            cfg.gt, cfg.pred, int(cfg.num_classes), int(cfg.ignore_index), class_names,
            output_dir=metrics_path.parent,  # confusion_matrix.csv / .png beside metrics.json
        )
    elif task == "panoptic":
        from segtrain.metrics.panoptic import score_panoptic

        for key in ("gt_dir", "pred_dir"):
            if cfg[key] is None:
                raise ValueError(f"score task=panoptic needs {key}=DIR (the folder of the {key[:-4]} PNGs)")
        metrics = score_panoptic(cfg.gt, cfg.gt_dir, cfg.pred, cfg.pred_dir, workers=cfg.workers)
    else:
        from segtrain.metrics.coco import score_coco
        from segtrain.metrics.lvis import score_lvis

        # The results file as given: by default its boxes place detections in size ranges, as
        # pycocotools' loadRes (and LVISResults) do; area_from=mask follows detectron2/MMDetection.
        iou_types = cfg.iou_types
        if iou_types is not None:
            iou_types = [iou_types] if isinstance(iou_types, str) else list(iou_types)
        scorer = score_coco if task == "instance" else score_lvis
        metrics = scorer(cfg.gt, cfg.pred, iou_types, area_from=cfg.area_from, backend=cfg.backend)
    report(metrics, metrics_path)
    return metrics
