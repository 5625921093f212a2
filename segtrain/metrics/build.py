"""Evaluators by name (`evaluators: [semantic, coco, panoptic]`) and their composition.

Each evaluator reads its own key of the predictions (segtrain.predictions) and its own part of
the targets; several run in one pass and their metric families merge into one dict.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from segtrain.data.meta import DatasetMeta
from segtrain.metrics.base import Evaluator

# name -> (prediction key it reads, target keys it needs, metric families it reports)
EVALUATORS: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    "semantic": ("sem_seg", ("semantic",), ("semantic",)),
    "coco": ("instances", ("boxes", "masks", "labels"), ("segm", "bbox")),
    "lvis": ("instances", (), ("segm", "bbox")),
    "panoptic": ("panoptic", ("panoptic", "segments"), ("panoptic",)),
}


class Evaluators:
    """Several evaluators as one: `reset`, `process(targets, predictions)`, `compute` -> the
    union of their metric families. Each member reduces across ranks itself (metrics/base.py)."""

    def __init__(self, members: dict[str, Evaluator]) -> None:
        self.members = dict(members)

    def reset(self) -> None:
        for evaluator in self.members.values():
            evaluator.reset()

    def process(self, targets: Sequence[dict], predictions: Sequence[dict]) -> None:
        for evaluator in self.members.values():
            evaluator.process(targets, predictions)

    def figures(self) -> dict[str, Any]:
        """Pictures the members drew of their last `compute()` (e.g. the semantic confusion
        matrix), by name, uint8 (3, H, W): what TensorBoard shows beside the metrics."""
        found: dict[str, Any] = {}
        for evaluator in self.members.values():
            found.update(evaluator.figures() if hasattr(evaluator, "figures") else {})
        return found

    def compute(self) -> dict:
        metrics: dict[str, Any] = {}
        for name, evaluator in self.members.items():
            result = evaluator.compute()
            clash = sorted(set(result) & set(metrics))
            if clash:
                raise ValueError(f"evaluator {name!r} reports {clash}, which another evaluator "
                                 "already reported; list each metric family once in `evaluators`")
            metrics.update(result)
        return metrics


def check_evaluator_names(names: Iterable[str], predicted: Sequence[str] | None = None) -> list[str]:
    """The names as a list; ValueError for an unknown name, a repeat, or (given the keys the
    model family predicts) an evaluator whose prediction key the model does not produce."""
    names = [str(n) for n in names]
    unknown = [n for n in names if n not in EVALUATORS]
    if unknown or not names:
        raise ValueError(f"evaluators={names}: unknown {unknown or 'empty list'}; expected some of "
                         f"{', '.join(EVALUATORS)}")
    if len(set(names)) != len(names) or {"coco", "lvis"} <= set(names):
        raise ValueError(f"evaluators={names}: each evaluator once (coco and lvis both report segm/bbox)")
    if predicted is not None:
        for name in names:
            key = EVALUATORS[name][0]
            if key not in predicted:
                raise ValueError(f"evaluators={names}: {name!r} reads `{key}` predictions, but this "
                                 f"model family predicts only {', '.join(predicted)}")
    return names


def evaluator_target_keys(names: Iterable[str]) -> tuple[str, ...]:
    """Target keys a dataset item needs for these evaluators."""
    keys: list[str] = []
    for name in names:
        keys += [k for k in EVALUATORS[name][1] if k not in keys]
    return tuple(keys)


def build_evaluators(names: Iterable[str], meta: DatasetMeta, output_dir: str | Path | None = None,
                     gt_json: str | None = None, max_dets: Sequence[int] | None = None) -> Evaluators:
    """The named evaluators over `meta`'s classes. With `output_dir`, those that write files put
    them there (coco/lvis: `<name>_instances_results.json`; panoptic: COCO panoptic PNGs + JSON;
    semantic: `confusion_matrix.csv` and `.png`).
    `gt_json`: the COCO/LVIS instances JSON to score against (None: built from the targets).
    `max_dets`: COCO's three detection caps (None: 1, 10, 100); AP counts the last, AR each."""
    members: dict[str, Evaluator] = {}
    for name in check_evaluator_names(names):
        members[name] = _build_one(name, meta, output_dir, gt_json, max_dets)
    return Evaluators(members)


def _build_one(name: str, meta: DatasetMeta, output_dir: str | Path | None,
               gt_json: str | None, max_dets: Sequence[int] | None = None) -> Evaluator:
    # Imported per evaluator: pycocotools and the panoptic code load only when used.
    if name == "semantic":
        from segtrain.metrics.semantic import SemanticEvaluator

        return SemanticEvaluator(meta.num_classes, meta.ignore_index, meta.classes, output_dir=output_dir)
    if name == "panoptic":
        from segtrain.metrics.panoptic import PanopticEvaluator

        return PanopticEvaluator(meta, output_dir=output_dir)
    from segtrain.predictions import instance_meta

    results = Path(output_dir) / f"{name}_instances_results.json" if output_dir is not None else None
    if name == "lvis":
        from segtrain.metrics.lvis import LVISEvaluator

        if gt_json is None:
            raise ValueError("the lvis evaluator needs the LVIS JSON: set dataset.gt_json")
        return LVISEvaluator(instance_meta(meta), gt=gt_json, iou_types=("segm", "bbox"),
                             area_from="mask", results_path=results)
    from segtrain.metrics.coco import COCOEvaluator

    return COCOEvaluator(instance_meta(meta), gt=gt_json, iou_types=("segm", "bbox"),
                         area_from="mask", results_path=results, max_dets=max_dets or (1, 10, 100))
