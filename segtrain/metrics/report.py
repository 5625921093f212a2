"""Readable tables and the metrics.json writer for the nested metrics dicts evaluators return."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any

from segtrain.utils.files import write_atomically

# The numbers each family shows in its one-line summary; families not listed show every scalar.
HEADLINE_KEYS: dict[str, tuple[str, ...]] = {
    "semantic": ("mIoU", "aAcc", "mAcc", "fwIoU"),
    "segm": ("AP", "AP50", "AP75"),
    "bbox": ("AP", "AP50", "AP75"),
    "panoptic": ("PQ", "SQ", "RQ"),
}
# Per-class columns of the semantic table, and its second summary line, when the metrics hold
# them (metrics.json files written before they existed do not).
SEMANTIC_COLUMNS = ("IoU", "Acc", "Dice", "Fscore", "Precision", "Recall")
SEMANTIC_SECOND_LINE = ("mDice", "mFscore", "mPrecision", "mRecall")


def _fmt(value: Any) -> str:
    """Two decimals; NaN (or a missing value written as null) as 'nan'."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "nan"
    return f"{float(value):.2f}"


def format_semantic_table(metrics: Mapping[str, Any]) -> str:
    """Per-class IoU/Acc (and Dice/Fscore/Precision/Recall when present) table plus summary rows
    (mIoU, aAcc, mAcc, fwIoU; then mDice, mFscore, mPrecision, mRecall), two decimals.

    metrics: the evaluator's output (`{"semantic": {...}}`) or its "semantic" part itself.
    """
    semantic = metrics.get("semantic", metrics)
    if "per_class" not in semantic or "mIoU" not in semantic:
        raise KeyError(
            f"no semantic metrics (mIoU, per_class) in a dict with keys {sorted(metrics)}"
        )
    per_class = semantic["per_class"]
    width = max([len("class"), *(len(str(name)) for name in per_class)])
    present = {key for v in per_class.values() for key in v}
    columns = [c for c in SEMANTIC_COLUMNS if c in present or c in ("IoU", "Acc")]
    lines = [f"{'class':<{width}}" + "".join(f"  {c:>9}" for c in columns)]
    lines += [f"{str(name):<{width}}" + "".join(f"  {_fmt(v.get(c)):>9}" for c in columns)
              for name, v in per_class.items()]
    rule = "-" * len(lines[0])
    summary = ["  ".join(f"{key} {_fmt(semantic.get(key))}" for key in HEADLINE_KEYS["semantic"])]
    if all(key in semantic for key in SEMANTIC_SECOND_LINE):
        summary.append("  ".join(f"{key} {_fmt(semantic[key])}" for key in SEMANTIC_SECOND_LINE))
    return "\n".join([lines[0], rule, *lines[1:], rule, *summary])


def format_ap_table(metrics: Mapping[str, Any]) -> str:
    """Per-class AP of each detection family (segm, bbox) side by side, then every summary number.

    metrics: an instance evaluator's output, e.g. `{"segm": {..., "per_class": {name: {"AP"}}}}`.
    """
    families = [f for f in ("segm", "bbox") if isinstance(metrics.get(f), Mapping)]
    if not families:
        raise KeyError(f"no detection metrics (segm, bbox) in a dict with keys {sorted(metrics)}")
    names = list(dict.fromkeys(n for f in families for n in metrics[f].get("per_class", {})))
    width = max([len("class"), *(len(str(name)) for name in names)])
    header = f"{'class':<{width}}" + "".join(f"  {f + ' AP':>8}" for f in families)
    rows = [
        f"{str(name):<{width}}"
        + "".join(f"  {_fmt(metrics[f].get('per_class', {}).get(name, {}).get('AP')):>8}" for f in families)
        for name in names
    ]
    keys = list(dict.fromkeys(k for f in families for k in _scalars(metrics[f])))
    summary = [f"{'':<5}" + "".join(f"  {k:>6}" for k in keys)]
    summary += [f"{f:<5}" + "".join(f"  {_fmt(metrics[f].get(k)):>6}" for k in keys) for f in families]
    rule = "-" * max(len(header), len(summary[0]))
    return "\n".join([header, rule, *rows, rule, *summary])



def format_pq_table(metrics: Mapping[str, Any]) -> str:
    """Per-class PQ/SQ/RQ (classes seen in the evaluation), then All/Things/Stuff rows.

    metrics: a panoptic evaluator's output (`{"panoptic": {...}}`) or its "panoptic" part itself.
    """
    panoptic = metrics.get("panoptic", metrics)
    if "PQ" not in panoptic:
        raise KeyError(f"no panoptic metrics (PQ) in a dict with keys {sorted(metrics)}")
    # Classes absent from both ground truth and predictions (all NaN) would only be noise.
    per_class = {n: v for n, v in panoptic.get("per_class", {}).items() if _fmt(v.get("PQ")) != "nan"}
    width = max([len("class"), len("Things"), *(len(str(name)) for name in per_class)])
    header = f"{'class':<{width}}" + "".join(f"  {k:>6}" for k in ("PQ", "SQ", "RQ"))
    rows = [f"{str(name):<{width}}" + "".join(f"  {_fmt(v.get(k)):>6}" for k in ("PQ", "SQ", "RQ"))
            for name, v in per_class.items()]
    summary = [f"{label:<{width}}"
               + "".join(f"  {_fmt(panoptic.get(k + suffix)):>6}" for k in ("PQ", "SQ", "RQ"))
               for label, suffix in (("All", ""), ("Things", "_th"), ("Stuff", "_st"))]
    rule = "-" * len(header)
    return "\n".join([header, rule, *rows, rule, *summary])

def _scalars(family: Mapping[str, Any]) -> list[str]:
    return [k for k, v in family.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]


def format_metrics_summary(metrics: Mapping[str, Any], prefix: str = "") -> str:
    """One line per family with its headline numbers, e.g. 'semantic: mIoU 45.12  aAcc 90.01 ...'.

    Nested groups of families (such as {"ema": {"semantic": {...}}}) are shown as 'ema/semantic'.
    """
    lines = []
    for name, family in metrics.items():
        if not isinstance(family, Mapping):
            continue
        scalars = _scalars(family)
        if not scalars:
            nested = format_metrics_summary(family, f"{prefix}{name}/")
            lines += [nested] if nested else []
            continue
        keys = [k for k in HEADLINE_KEYS.get(name, tuple(scalars)) if k in family]
        lines.append(f"{prefix}{name}: " + "  ".join(f"{k} {_fmt(family[k])}" for k in keys))
    return "\n".join(lines)


def json_safe(value: Any) -> Any:
    """Plain JSON types: mappings and sequences recursively, 0-d tensors and numpy scalars as
    numbers, non-finite floats as None (strict JSON has no NaN/Infinity), other objects as str."""
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (bool, str, int)) or value is None:
        return value
    if hasattr(value, "item"):  # 0-d torch tensors and numpy scalars
        value = value.item()
        if isinstance(value, (bool, int)):
            return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return str(value)


def flatten_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The numbers of a metrics dict as {"semantic/mIoU": 61.2, "ema/semantic/mIoU": ...};
    `per_class` tables are left out. NaN (or None, as metrics.json writes it) stays NaN."""
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        if key == "per_class":
            continue
        if isinstance(value, Mapping):
            flat.update(flatten_metrics(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[f"{prefix}{key}"] = float(value)
        elif value is None:
            flat[f"{prefix}{key}"] = math.nan
    return flat


def write_metrics_json(metrics: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Write `metrics` as indented strict JSON (NaN -> null) atomically, creating the parent dir.

    The text goes to a temporary file in the same directory, is fsynced, then renamed over
    `path`, so a reader never sees a half-written file.
    """
    text = json.dumps(json_safe(metrics), indent=2, allow_nan=False) + "\n"
    write_atomically(path, lambda f: f.write(text), binary=False)


def report(metrics: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Print the tables and write metrics.json (what every command ends with).

    Each family present gets its table: semantic (per-class IoU/Acc), segm/bbox (per-class AP,
    then every summary number: AP... and AR1/AR10/AR100/ARs/ARm/ARl as pycocotools prints them),
    panoptic (PQ/SQ/RQ); then one headline line per family.
    """
    if "semantic" in metrics:
        print(format_semantic_table(metrics))
    if any(isinstance(metrics.get(family), Mapping) for family in ("segm", "bbox")):
        print(format_ap_table(metrics))
    if isinstance(metrics.get("panoptic"), Mapping):
        print(format_pq_table(metrics))
    print(format_metrics_summary(metrics))
    write_metrics_json(metrics, path)
    print(f"metrics written to {path}")
