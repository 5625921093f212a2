"""Evaluators (reset / process / compute) and the metrics report: tables and metrics.json."""

from segtrain.metrics.base import Evaluator
from segtrain.metrics.report import (
    format_metrics_summary,
    format_semantic_table,
    write_metrics_json,
)
from segtrain.metrics.semantic import (
    SemanticEvaluator,
    compute_confusion_matrix,
    score_semantic_dirs,
    summarize_confusion_matrix,
)

__all__ = [
    "Evaluator",
    "SemanticEvaluator",
    "compute_confusion_matrix",
    "format_metrics_summary",
    "format_semantic_table",
    "score_semantic_dirs",
    "summarize_confusion_matrix",
    "write_metrics_json",
]
