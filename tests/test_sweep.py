"""Multirun summaries (the SweepSummary callback, `segtrain summarize`) and the sweeper/launcher
presets (Optuna, SLURM through submitit)."""

from __future__ import annotations

import atexit
import csv
import json
import math

import pytest
import torch
from conftest import TINY, run_cli
from hydra.core.utils import JobReturn, JobStatus
from omegaconf import OmegaConf

from segtrain.metrics.report import flatten_metrics
from segtrain.sweep import SweepSummary, sort_rows
from segtrain.utils.checkpoint import load_checkpoint

FAST = [*TINY, "trainer.max_iters=2", "trainer.eval_every=2", "trainer.ckpt_every=2",
        "trainer.vis_images=0"]


def _table_rows(stdout: str) -> list[list[str]]:
    """The body rows of the last table printed (split on whitespace)."""
    lines = stdout.strip().splitlines()
    start = max(i for i, line in enumerate(lines) if line.startswith("job  status"))
    body = []
    for line in lines[start + 2:]:
        if not line[:1].isdigit():
            break
        body.append(line.split())
    return body


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A two-run sweep through the real CLI."""
    work = tmp_path_factory.mktemp("sweep")
    sweep_dir = work / "sweep"
    result = run_cli("train", "-m", *FAST, "optimizer.lr=0.01,0.0001",
                     f"hydra.sweep.dir={sweep_dir}", cwd=work)
    assert result.returncode == 0, result.stderr
    return work, sweep_dir, result


@pytest.mark.slow
def test_multirun_summary_names_each_run_with_its_overrides_and_metrics(sweep):
    _, sweep_dir, result = sweep
    assert sorted(p.name for p in sweep_dir.iterdir() if p.is_dir()) == ["0", "1"]
    runs = json.loads((sweep_dir / "summary.json").read_text())["runs"]
    assert [r["run_dir"] for r in runs] == ["0", "1"]
    with open(sweep_dir / "summary.csv") as f:
        csv_rows = list(csv.DictReader(f))
    for run, row, lr in zip(runs, csv_rows, ("0.01", "0.0001")):
        run_dir = sweep_dir / run["run_dir"]
        assert f"optimizer.lr={lr}" in run["overrides"]
        assert f"optimizer.lr={lr}" in row["overrides"].split()
        assert run["status"] == row["status"] == "completed"
        final = flatten_metrics(json.loads((run_dir / "metrics.json").read_text()))
        assert "semantic/mIoU" in final and not any("per_class" in k for k in final)
        for key, value in final.items():
            assert run["final"][key] == pytest.approx(value, nan_ok=True)
            assert float(row[key] or math.nan) == pytest.approx(value, nan_ok=True)
        trainer_state = load_checkpoint(run_dir / "checkpoints" / "last.pt")["trainer"]
        assert run["metric"] == "semantic/mIoU"
        assert run["best"] == trainer_state["best_value"] == float(row["best/semantic/mIoU"])
        assert run["best_step"] == trainer_state["best_step"]
        # What the train app returned to Hydra: the configured objective, the best value.
        assert run["objective"] == trainer_state["best_value"]
        assert run["wall_s"] > 0
    assert "sweep summary" in result.stdout
    assert {row[0] for row in _table_rows(result.stdout)} == {"0", "1"}


@pytest.mark.slow
@pytest.mark.parametrize("order", ["desc", "asc"])
def test_summarize_prints_the_runs_sorted_by_the_chosen_metric(sweep, order):
    work, sweep_dir, _ = sweep
    runs = json.loads((sweep_dir / "summary.json").read_text())["runs"]
    result = run_cli("summarize", str(sweep_dir), "sort=semantic/aAcc", f"order={order}", cwd=work)
    assert result.returncode == 0, result.stderr
    header = [line for line in result.stdout.splitlines() if line.startswith("job  status")]
    header = header[0].split()
    column = header.index("semantic/aAcc")
    rows = _table_rows(result.stdout)
    values = [float(row[column]) for row in rows]
    assert values == sorted(values, reverse=order == "desc")
    by_job = {str(r["job"]): r["final"]["semantic/aAcc"] for r in runs}
    assert [f"{by_job[row[0]]:.2f}" for row in rows] == [row[column] for row in rows]

    by_job_order = run_cli("summarize", str(sweep_dir), "sort=job", "order=asc", cwd=work)
    assert [row[0] for row in _table_rows(by_job_order.stdout)] == ["0", "1"]
    by_job_desc = run_cli("summarize", str(sweep_dir), "sort=job", cwd=work)
    assert [row[0] for row in _table_rows(by_job_desc.stdout)] == ["1", "0"]


@pytest.mark.slow
def test_summarize_of_an_unknown_metric_lists_the_columns(sweep):
    work, sweep_dir, _ = sweep
    result = run_cli("summarize", str(sweep_dir), "sort=semantic/nope", cwd=work)
    assert result.returncode == 1
    assert "sort=semantic/nope" in result.stderr and "semantic/mIoU" in result.stderr
    missing = run_cli("summarize", str(work / "nowhere"), cwd=work)
    assert missing.returncode == 1 and "nowhere" in missing.stderr


@pytest.mark.slow
def test_a_run_that_fails_shows_as_failed_and_the_sweep_goes_on(tmp_path):
    # The first run names a metric the evaluation lacks: a user error. Under multirun it is
    # re-raised to Hydra, which records the job as failed and runs the next one.
    sweep_dir = tmp_path / "sweep"
    result = run_cli("train", "-m", *FAST, "trainer.best_metric=semantic/nope,semantic/mIoU",
                     f"hydra.sweep.dir={sweep_dir}", cwd=tmp_path)
    assert result.returncode == 1
    assert "semantic/nope" in result.stderr
    runs = {r["run_dir"]: r for r in json.loads((sweep_dir / "summary.json").read_text())["runs"]}
    assert runs["0"]["status"] == "failed" and "semantic/nope" in runs["0"]["error"]
    assert "trainer.best_metric=semantic/nope" in runs["0"]["overrides"]
    assert runs["1"]["status"] == "completed" and runs["1"]["best"] is not None
    assert json.loads((sweep_dir / "0" / "run_summary.json").read_text())["status"] == "failed"
    table = {row[0]: row[1] for row in _table_rows(result.stdout)}
    assert table == {"0": "failed", "1": "completed"}
    summarized = run_cli("summarize", str(sweep_dir), cwd=tmp_path)
    # Sorted by the best value: the run without one comes last.
    assert [row[:2] for row in _table_rows(summarized.stdout)] == [["1", "completed"],
                                                                  ["0", "failed"]]


def _job_config(tmp_path, run_dir):
    return OmegaConf.create({
        "trainer": {"best_metric": "auto"},
        "task": {"_target_": "segtrain.tasks.semantic.SemanticTask"},
        "hydra": {"runtime": {"output_dir": str(run_dir)}, "sweep": {"dir": str(tmp_path / "sw")},
                  "job": {"num": 0}, "overrides": {"task": ["optimizer.lr=0.1"]}},
    })


def test_a_job_that_raises_is_recorded_as_failed_with_its_error(tmp_path):
    callback = SweepSummary()
    run_dir = tmp_path / "sw" / "0"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text("- optimizer.lr=0.1\n")
    config = _job_config(tmp_path, run_dir)
    callback.on_job_start(config)
    try:
        running = json.loads((run_dir / "run_summary.json").read_text())
        assert running["status"] == "running" and running["metric"] == "semantic/mIoU"
        job_return = JobReturn(status=JobStatus.FAILED, _return_value=RuntimeError("boom"))
        callback.on_job_end(config, job_return)
    finally:
        atexit.unregister(callback._process_exit)
    record = json.loads((run_dir / "run_summary.json").read_text())
    assert record["status"] == "failed" and record["error"] == "RuntimeError: boom"
    with open(tmp_path / "sw" / "summary.csv") as f:
        (row,) = csv.DictReader(f)
    assert row["status"] == "failed" and row["overrides"] == "optimizer.lr=0.1"


def test_a_single_run_writes_no_sweep_records(tmp_path):
    callback = SweepSummary()
    config = _job_config(tmp_path, tmp_path / "outputs" / "run")
    callback.on_job_start(config)
    callback.on_job_end(config, JobReturn(status=JobStatus.COMPLETED, _return_value=1.0))
    assert not (tmp_path / "outputs" / "run" / "run_summary.json").exists()
    assert not (tmp_path / "sw").exists()


def test_runs_without_a_value_sort_last_in_either_order():
    rows = [{"job": 0, "metric": "m", "best": 1.0}, {"job": 1, "metric": "m", "best": None},
            {"job": 2, "metric": "m", "best": 3.0}, {"job": 3, "metric": "m", "best": math.nan}]
    assert [r["job"] for r in sort_rows(rows)] == [2, 0, 1, 3]
    assert [r["job"] for r in sort_rows(rows, descending=False)] == [0, 2, 1, 3]


# ------------------------------------------------------------------------------------ presets
def test_optuna_preset_direction_follows_best_mode():
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    for mode, direction in (("max", "maximize"), ("min", "minimize")):
        GlobalHydra.instance().clear()
        with initialize_config_module(config_module="segtrain.conf", version_base="1.3"):
            cfg = compose("train", [f"trainer.best_mode={mode}", "hydra/sweeper=segtrain_optuna"],
                          return_hydra_config=True)
        assert cfg.hydra.sweeper.direction == direction
        assert cfg.hydra.sweeper.params["optimizer.lr"].startswith("tag(log")
    GlobalHydra.instance().clear()


@pytest.mark.slow
def test_optuna_sweep_of_two_trials_returns_the_best_metric(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    sweep_dir = tmp_path / "sweep"
    result = run_cli("train", "-m", *FAST, "hydra/sweeper=segtrain_optuna",
                     "hydra.sweeper.n_trials=2", f"hydra.sweep.dir={sweep_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Directions: ['maximize']" in result.stdout + result.stderr
    runs = json.loads((sweep_dir / "summary.json").read_text())["runs"]
    assert [r["status"] for r in runs] == ["completed", "completed"]
    for run in runs:
        assert any(o.startswith("optimizer.lr=") for o in run["overrides"])
        state = torch.load(sweep_dir / run["run_dir"] / "checkpoints" / "last.pt",
                           weights_only=True)["trainer"]
        assert run["objective"] == state["best_value"]
    best = OmegaConf.load(sweep_dir / "optimization_results.yaml")
    assert best.best_value == pytest.approx(max(r["objective"] for r in runs))


def test_slurm_preset_runs_one_task_per_gpu_with_rank_variables():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="segtrain.conf", version_base="1.3"):
        cfg = compose("train", ["hydra/launcher=segtrain_slurm", "hydra.launcher.tasks_per_node=4"],
                      return_hydra_config=True)
    GlobalHydra.instance().clear()
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.gpus_per_node == 4 and launcher.max_num_timeout > 0
    assert set(cfg.hydra.job.env_set) >= {"RANK", "LOCAL_RANK", "WORLD_SIZE"}
    assert any("MASTER_ADDR" in line for line in launcher.setup)
    assert "dataset" in cfg and "model" in cfg  # the preset adds to the config, replaces nothing
