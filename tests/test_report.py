"""metrics.json writer (strict JSON, atomic) and the console tables and summaries."""

from __future__ import annotations

import json
import math

import pytest
import torch

from segtrain.metrics import report
from segtrain.metrics.report import (
    format_metrics_summary,
    format_semantic_table,
    write_metrics_json,
)

METRICS = {
    "semantic": {
        "mIoU": 72.2222, "aAcc": 80.0, "mAcc": 83.3333, "fwIoU": 66.6667,
        "per_class": {
            "background": {"IoU": 50.0, "Acc": 50.0},
            "traffic light": {"IoU": 0.0, "Acc": math.nan},
            "sky": {"IoU": math.nan, "Acc": math.nan},
        },
    }
}


def reject_constant(name: str):
    raise ValueError(f"non-strict JSON constant {name}")


def test_metrics_json_is_strict_json_with_null_for_nan(tmp_path):
    path = tmp_path / "deep" / "run" / "metrics.json"
    write_metrics_json({**METRICS, "extra": {"inf": math.inf, "t": torch.tensor(2.5)}}, path)
    loaded = json.loads(path.read_text(), parse_constant=reject_constant)
    per_class = loaded["semantic"]["per_class"]
    assert per_class["sky"] == {"IoU": None, "Acc": None}
    assert per_class["traffic light"] == {"IoU": 0.0, "Acc": None}
    assert loaded["semantic"]["mIoU"] == 72.2222
    assert loaded["extra"] == {"inf": None, "t": 2.5}


def test_metrics_json_replaces_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text("old")
    write_metrics_json({"toy": {"mse": 1.0}}, path)
    assert json.loads(path.read_text()) == {"toy": {"mse": 1.0}}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_a_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    write_metrics_json({"toy": {"mse": 1.0}}, path)

    def failing_fsync(fd: int) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(report.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="disk full"):
        write_metrics_json({"toy": {"mse": 2.0}}, path)
    assert json.loads(path.read_text()) == {"toy": {"mse": 1.0}}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_semantic_table_lists_every_class_with_two_decimals_and_nan():
    lines = format_semantic_table(METRICS).splitlines()
    rows = {line.rsplit(None, 2)[0].strip(): line.split()[-2:] for line in lines[2:5]}
    assert rows == {
        "background": ["50.00", "50.00"],
        "traffic light": ["0.00", "nan"],
        "sky": ["nan", "nan"],
    }
    assert lines[-1] == "mIoU 72.22  aAcc 80.00  mAcc 83.33  fwIoU 66.67"
    assert lines[0].split() == ["class", "IoU", "Acc"]


def test_semantic_table_reads_metrics_back_from_json(tmp_path):
    write_metrics_json(METRICS, tmp_path / "m.json")
    reloaded = json.loads((tmp_path / "m.json").read_text())
    assert format_semantic_table(reloaded) == format_semantic_table(METRICS)
    assert format_semantic_table(reloaded["semantic"]) == format_semantic_table(METRICS)


def test_semantic_table_without_semantic_metrics_is_a_key_error():
    with pytest.raises(KeyError, match="no semantic metrics"):
        format_semantic_table({"toy": {"mse": 1.0}})


def test_summary_has_one_line_of_headline_numbers_per_family():
    metrics = {
        **METRICS,
        "segm": {"AP": 30.0, "AP50": 50.0, "AP75": 31.0, "APs": 10.0, "per_class": {}},
        "toy": {"mse": 0.125},
        "ema": {"semantic": {**METRICS["semantic"], "mIoU": 70.0}},
    }
    assert format_metrics_summary(metrics).splitlines() == [
        "semantic: mIoU 72.22  aAcc 80.00  mAcc 83.33  fwIoU 66.67",
        "segm: AP 30.00  AP50 50.00  AP75 31.00",
        "toy: mse 0.12",
        "ema/semantic: mIoU 70.00  aAcc 80.00  mAcc 83.33  fwIoU 66.67",
    ]
