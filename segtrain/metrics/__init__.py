"""Evaluators (reset / process / compute) and the metrics report: tables and metrics.json.

The semantic names load on first use (PEP 562): importing `segtrain.metrics.coco` for
`segtrain score` must not pull in torch through this package.
"""

from importlib import import_module
from typing import Any

from segtrain.metrics.base import Evaluator
from segtrain.metrics.report import (
    format_metrics_summary,
    format_semantic_table,
    write_metrics_json,
)

_SEMANTIC = ("SemanticEvaluator", "compute_confusion_matrix", "score_semantic_dirs",
             "summarize_confusion_matrix")

__all__ = [
    "Evaluator",
    "format_metrics_summary",
    "format_semantic_table",
    "write_metrics_json",
    *_SEMANTIC,
]


def __getattr__(name: str) -> Any:
    if name in _SEMANTIC:
        return getattr(import_module("segtrain.metrics.semantic"), name)
    raise AttributeError(f"module 'segtrain.metrics' has no attribute {name!r}")
