"""bench/gpu.py runs to completion on a CPU with --dry-run and writes every row of its table."""

from __future__ import annotations

import math
import subprocess
import sys

from conftest import ROOT

MODELS = ("DeepLabV3 (dry run", "DeepLabV3+ (dry run", "Mask R-CNN (dry run", "Mask2Former (dry run")
COMPARISONS = ("bf16 autocast vs fp32", "fp16 autocast + GradScaler vs fp32", "channels_last on vs off",
               "segtrain Trainer vs bare loop", "DDP-wrapped (1 process) vs unwrapped",
               "torch.compile on vs off")
# Cells a CPU dry run reports in words instead of a figure, and for which rows.
EXPLAINED = {("fp16 autocast + GradScaler vs fp32", "n/a on CPU"),
             ("torch.compile on vs off", "skipped in the dry run (compiling takes minutes on a CPU)")}


def _number(cell: str) -> float:
    value = float(cell.rstrip("x"))
    assert math.isfinite(value) and value > 0, cell
    return value


def test_dry_run_writes_every_row_with_finite_positive_figures(tmp_path):
    output = tmp_path / "gpu.md"
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu.py"), "--dry-run", "--device", "cpu",
         "--output", str(output)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    table = output.read_text()
    assert table == result.stdout
    rows = [[cell.strip() for cell in line.strip("|").split(" | ")] for line in table.splitlines()
            if line.startswith("| ") and "---" not in line]
    header, rows = rows[0], rows[1:]
    assert header[-1] == "variant / baseline"
    assert len(rows) == len(MODELS) * len(COMPARISONS)
    for model in MODELS:
        for comparison in COMPARISONS:
            found = [r for r in rows if r[0].startswith(model) and r[1].startswith(comparison)
                     and (model != "DeepLabV3 (dry run" or not r[0].startswith("DeepLabV3+"))]
            assert len(found) == 1, (model, comparison)
            _, _, baseline, variant, ratio = found[0]
            _number(baseline)
            if (comparison, variant) in EXPLAINED:
                assert ratio == "-"
                explained_mask_rcnn_only = comparison != "torch.compile on vs off" or model.startswith("Mask")
                assert explained_mask_rcnn_only, (model, comparison)
                continue
            expected = _number(variant) / _number(baseline)
            assert math.isclose(_number(ratio), expected, rel_tol=0.02, abs_tol=0.01)
