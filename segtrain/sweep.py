"""Multirun summaries: a Hydra callback that records each run of a sweep, and the table of a sweep."""

from __future__ import annotations

import atexit
import csv
import io
import json
import math
import os
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from segtrain.metrics.report import HEADLINE_KEYS, flatten_metrics, json_safe
from segtrain.utils.files import write_atomically

RUN_RECORD = "run_summary.json"  # in each run directory of a sweep
SUMMARY_CSV, SUMMARY_JSON = "summary.csv", "summary.json"  # in the sweep directory
FIXED_COLUMNS = ("job", "status", "wall_s", "metric", "best", "best_step", "objective")


# ------------------------------------------------------------------------------------ one run
def primary_metric(cfg: DictConfig) -> str | None:
    """The metric that selects best.pt: trainer.best_metric, `auto` meaning the task's own."""
    from hydra.utils import get_object

    name = OmegaConf.select(cfg, "trainer.best_metric")
    if name == "auto":
        target = OmegaConf.select(cfg, "task._target_")
        name = getattr(get_object(target), "primary_metric", None) if target else None
    return name


def read_trainer_state(run_dir: Path) -> dict[str, Any]:
    """best_value, best_step and step from checkpoints/last.pt ({} when there is none)."""
    last = run_dir / "checkpoints" / "last.pt"
    if not last.is_file():
        return {}
    from segtrain.utils.checkpoint import read_trainer_state as read_state  # imports torch

    state = read_state(last)
    return {"best": state.get("best_value"), "best_step": state.get("best_step"),
            "step": state.get("step")} if state else {}


def collect_run(run_dir: Path) -> dict[str, Any]:
    """Everything known about one run directory: its record (status, wall time, objective),
    final metrics (metrics.json), best value (the trainer state in last.pt) and overrides."""
    record: dict[str, Any] = {}
    if (run_dir / RUN_RECORD).is_file():
        record = json.loads((run_dir / RUN_RECORD).read_text())
    overrides_file = run_dir / ".hydra" / "overrides.yaml"
    if "overrides" not in record and overrides_file.is_file():
        record["overrides"] = OmegaConf.to_container(OmegaConf.load(overrides_file))
    record.setdefault("status", "unknown")  # a run directory without a record of its own
    if record.get("best") is None:
        record.update({k: v for k, v in read_trainer_state(run_dir).items() if k != "step"})
    metrics_file = run_dir / "metrics.json"
    record["final"] = flatten_metrics(json.loads(metrics_file.read_text())) if (
        metrics_file.is_file()) else {}
    return record


# ---------------------------------------------------------------------------------- the sweep
def find_runs(sweep_dir: Path) -> list[Path]:
    """Run directories under a sweep directory (those holding .hydra/overrides.yaml)."""
    return sorted(p.parent.parent for p in sweep_dir.rglob(".hydra/overrides.yaml"))


def collect_sweep(sweep_dir: Path) -> list[dict[str, Any]]:
    """One record per run directory, in job order; `run_dir` relative to the sweep directory."""
    rows = []
    for run_dir in find_runs(sweep_dir):
        row = collect_run(run_dir)
        row["run_dir"] = str(run_dir.relative_to(sweep_dir))
        rows.append(row)
    return sorted(rows, key=lambda r: (r.get("job") is None, r.get("job") or 0, r["run_dir"]))


def _cell(row: Mapping[str, Any], column: str) -> Any:
    """A row's value for a column: a fixed field, `best/<metric>` or a final metric path."""
    if column in FIXED_COLUMNS or column in ("run_dir", "error"):
        return row.get(column)
    if column.startswith("best/"):
        return row.get("best") if row.get("metric") == column[len("best/"):] else None
    return row.get("final", {}).get(column)


def metric_columns(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    """`best/<metric>` for each primary metric, then every final metric, in first-seen order."""
    rows = list(rows)
    best = dict.fromkeys(f"best/{r['metric']}" for r in rows if r.get("metric"))
    final = dict.fromkeys(key for r in rows for key in r.get("final", {}))
    return [*best, *final]


def write_summary(sweep_dir: Path, rows: list[dict[str, Any]]) -> tuple[Path, Path]:
    """summary.json (the records) and summary.csv (one flat row per run) in the sweep directory."""
    columns = ["job", "run_dir", "status", "overrides", "wall_s", "best_step", "objective",
               *metric_columns(rows), "error"]
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(columns)
    for row in rows:
        cells = [" ".join(row.get("overrides") or []) if c == "overrides" else _cell(row, c)
                 for c in columns]
        writer.writerow(["" if v is None or (isinstance(v, float) and math.isnan(v)) else v
                         for v in cells])
    csv_path = write_atomically(sweep_dir / SUMMARY_CSV, lambda f: f.write(text.getvalue()),
                                binary=False)
    payload = json.dumps(json_safe({"sweep_dir": str(sweep_dir), "runs": rows}), indent=2)
    json_path = write_atomically(sweep_dir / SUMMARY_JSON, lambda f: f.write(payload + "\n"),
                                 binary=False)
    return csv_path, json_path


def sort_rows(rows: list[dict[str, Any]], key: str | None = None,
              descending: bool = True) -> list[dict[str, Any]]:
    """Rows ordered by a column (default: the primary metric's best value); runs without a value
    (failed, NaN) come last in either order. KeyError names the columns there are."""
    key = key or "best"
    if key == "best":
        # Runs may name different primary metrics (a sweep over trainer.best_metric, a run
        # that failed before reporting): the one most runs have a value for.
        keys = [c for c in metric_columns(rows) if c.startswith("best/")]
        key = max(keys, key=lambda c: sum(_cell(r, c) is not None for r in rows)) if keys else "best"
    known = {"job", "wall_s", "best", "best_step", "objective", *metric_columns(rows)}
    if rows and key not in known:
        raise KeyError(f"sort={key}: no such column in this sweep; expected one of: "
                       f"{', '.join(sorted(known))}")

    def number(row: Mapping[str, Any]) -> float | None:
        value = _cell(row, key)
        return float(value) if isinstance(value, (int, float)) and not math.isnan(value) else None

    with_value = [r for r in rows if number(r) is not None]
    without = [r for r in rows if number(r) is None]
    return sorted(with_value, key=number, reverse=descending) + without


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def _is_headline(column: str) -> bool:
    """best/<metric>, and a family's headline numbers (semantic/mIoU, ema/segm/AP, ...)."""
    parts = column.split("/")
    return parts[0] == "best" or (len(parts) >= 2 and parts[-1] in HEADLINE_KEYS.get(parts[-2], ()))


def format_table(rows: list[dict[str, Any]], sort_key: str | None = None) -> str:
    """The console table: job, status, wall time, best primary metric (and its step), the final
    headline numbers of each family (all numbers are in summary.csv), and the overrides that
    differ between runs (those shared by all are listed once, below)."""
    headline = [c for c in metric_columns(rows) if c == sort_key or _is_headline(c)]
    columns = ["job", "status", "wall_s", *headline, "best_step"]
    overrides = [r.get("overrides") or [] for r in rows]
    common = [o for o in overrides[0] if all(o in others for others in overrides)] if rows else []
    header = [*columns, "overrides"]
    body = [[_fmt(_cell(r, c)) for c in columns] + [" ".join(o for o in ov if o not in common)]
            for r, ov in zip(rows, overrides)]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip()
             for line in [header, *body]]
    notes = [f"all runs: {' '.join(common)}"] if common and len(rows) > 1 else []
    notes += [f"failed, job {r.get('job', r['run_dir'])}: {r['error']}" for r in rows
              if r.get("error")]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:], *notes])


def summarize(sweep_dir: Path, sort_key: str | None = None, descending: bool = True) -> str:
    """Rebuild the summary of a sweep directory from its run directories; the table, sorted."""
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"sweep directory not found: {sweep_dir}; expected a multirun "
                                "directory such as multirun/<date>/<time>")
    rows = collect_sweep(sweep_dir)
    if not rows:
        raise FileNotFoundError(f"no runs under {sweep_dir}: expected run directories holding "
                                ".hydra/overrides.yaml (a `segtrain train -m ...` sweep directory)")
    write_summary(sweep_dir, rows)
    return format_table(sort_rows(rows, sort_key, descending), sort_key)


SUMMARIZE_USAGE = "usage: segtrain summarize SWEEP_DIR [sort=METRIC] [order=desc|asc]"


def summarize_command(args: list[str]) -> int:
    """`segtrain summarize DIR [sort=METRIC] [order=asc]`; returns the exit status."""
    if not args or args[0] in ("-h", "--help"):
        print(f"{SUMMARIZE_USAGE}\n\nsort: best (default: the primary metric's best value), a "
              "final metric such as semantic/mIoU, best/<metric>, wall_s or job.")
        return 0 if args else 2
    options = dict(arg.split("=", 1) for arg in args[1:] if "=" in arg)
    unknown = [a for a in args[1:] if "=" not in a] + sorted(set(options) - {"sort", "order"})
    if unknown or options.get("order", "desc") not in ("asc", "desc"):
        print(f"error: unexpected {unknown or options['order']!r}\n{SUMMARIZE_USAGE}", file=sys.stderr)
        return 2
    try:
        print(summarize(Path(args[0]), options.get("sort"), options.get("order", "desc") == "desc"))
    except (FileNotFoundError, KeyError) as err:
        print(f"error: {err.args[0]}", file=sys.stderr)
        return 1
    return 0


# ----------------------------------------------------------------------------- the callback
class SweepSummary(Callback):
    """Writes run_summary.json into each run directory of a multirun (status, wall time, the
    objective returned to the sweeper, best value) and refreshes summary.csv/json in the sweep
    directory as each job ends; prints the table when the sweep ends. Runs only in multirun jobs.

    A failed job is recorded as failed (under multirun segtrain re-raises user errors to Hydra,
    which runs the other jobs). Hydra ends a sweep with a failed job without calling
    on_multirun_end, and a job that exits the process (a stop signal, a kill) never reaches
    on_job_end: an exit hook records such a job as failed and prints the table.
    Jobs under a remote launcher (submitit) call on_job_* on their node, so the summary files
    stay current there too; `segtrain summarize DIR` rebuilds them from the run directories.
    """

    def __init__(self) -> None:
        self._running: tuple[Path, dict[str, Any]] | None = None
        self._sweep_dir: Path | None = None  # set by this process's first sweep job
        self._printed = False

    @staticmethod
    def _dirs(config: DictConfig) -> tuple[Path, Path] | None:
        """(run_dir, sweep_dir) of a sweep job; None for a single run."""
        run_dir = Path(config.hydra.runtime.output_dir)
        sweep_dir = Path(str(config.hydra.sweep.dir)).absolute()
        return (run_dir, sweep_dir) if run_dir.is_relative_to(sweep_dir) else None

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        dirs = self._dirs(config)
        # Under SLURM with several tasks (or torchrun) every rank runs the job: rank 0 records it.
        # Called inside hydra.job.env_set, which is where segtrain_slurm sets RANK.
        if dirs is None or int(os.environ.get("RANK", "0")) != 0:
            return
        try:
            metric = primary_metric(config)
        except Exception:  # a bad task target fails the job itself, with Hydra's message
            metric = None
        record = {"job": OmegaConf.select(config, "hydra.job.num"),
                  "overrides": list(config.hydra.overrides.task), "status": "running",
                  "started": time.time(), "metric": metric}
        _write_record(dirs[0], record)
        self._running = dirs[0], record
        if self._sweep_dir is None:
            atexit.register(self._process_exit)
        self._sweep_dir = dirs[1]

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        if self._running is None:
            return
        value = job_return._return_value  # the property re-raises a failed job's exception
        failed = job_return.status.name != "COMPLETED"
        self._finish(status="failed" if failed else "completed",
                     error=f"{type(value).__name__}: {value}" if failed else None,
                     objective=float(value) if isinstance(value, (int, float)) else None)
        write_summary(self._sweep_dir, collect_sweep(self._sweep_dir))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._print(Path(str(config.hydra.sweep.dir)).absolute())

    def _finish(self, **fields: Any) -> None:
        run_dir, record = self._running
        self._running = None
        record.update(fields, wall_s=round(time.time() - record["started"], 2))
        record.update(read_trainer_state(run_dir))
        _write_record(run_dir, record)

    def _print(self, sweep_dir: Path) -> None:
        rows = collect_sweep(sweep_dir) if sweep_dir.is_dir() else []
        if rows and not self._printed:
            self._printed = True
            csv_path, json_path = write_summary(sweep_dir, rows)
            print(f"\nsweep summary ({csv_path}, {json_path.name}):\n"
                  f"{format_table(sort_rows(rows))}", flush=True)

    def _process_exit(self) -> None:
        if self._running is not None:
            self._finish(status="failed", error="the process exited before the job returned; "
                                                f"see {self._running[0]}")
        self._print(self._sweep_dir)


def _write_record(run_dir: Path, record: Mapping[str, Any]) -> None:
    text = json.dumps(json_safe(record), indent=2)
    write_atomically(run_dir / RUN_RECORD, lambda f: f.write(text + "\n"), binary=False)
