"""SLURM preemption under submitit: SIGUSR2 writes last.pt and hands over to submitit's requeue
handler; a requeued job finds the same run directory and resumes with resume=auto."""

from __future__ import annotations

import os
import pickle
import signal

import pytest
from conftest import TINY, run_cli
from test_trainer import ToyTask, make_trainer

from segtrain.errors import TrainingInterrupted
from segtrain.train import resolve_resume
from segtrain.utils.checkpoint import load_checkpoint


class FakeSubmititHandler:
    """Stands in for submitit's checkpoint_and_try_requeue; records what it found on disk."""

    def __init__(self, last_pt, exit_after: bool) -> None:
        self.last_pt, self.exit_after = last_pt, exit_after
        self.calls: list[tuple[int, int | None]] = []

    def __call__(self, signum, frame) -> None:
        step = load_checkpoint(self.last_pt)["trainer"]["step"] if self.last_pt.exists() else None
        self.calls.append((signum, step))
        if self.exit_after:
            raise SystemExit(-1)  # what submitit does once the job is requeued


@pytest.fixture
def fake_submitit(tmp_path):
    """Install a fake previous SIGUSR2 handler, as submitit's process_job does; restore after."""
    before = signal.getsignal(signal.SIGUSR2)

    def install(exit_after: bool) -> FakeSubmititHandler:
        handler = FakeSubmititHandler(tmp_path / "checkpoints" / "last.pt", exit_after)
        signal.signal(signal.SIGUSR2, handler)
        return handler

    yield install
    signal.signal(signal.SIGUSR2, before)


def _signal_at(step: int, signum: int = signal.SIGUSR2) -> ToyTask:
    task = ToyTask()
    task.on_step = lambda n: os.kill(os.getpid(), signum) if n == step else None
    return task


def test_sigusr2_writes_last_pt_then_calls_the_previous_handler(tmp_path, fake_submitit):
    handler = fake_submitit(exit_after=True)
    trainer = make_trainer(tmp_path, task=_signal_at(3), eval_every=0, ckpt_every=0)
    with pytest.raises(SystemExit):
        trainer.fit()
    # The handler ran once, after the iteration in flight finished and last.pt held it.
    assert handler.calls == [(signal.SIGUSR2, 3)]
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["trainer"]["step"] == 3
    assert signal.getsignal(signal.SIGUSR2) is handler  # fit restored it


def test_sigusr2_stops_when_the_previous_handler_returns(tmp_path, fake_submitit):
    # submitit's handler returns without exiting on ranks > 0: the trainer still stops.
    handler = fake_submitit(exit_after=False)
    trainer = make_trainer(tmp_path, task=_signal_at(2), eval_every=0, ckpt_every=0)
    with pytest.raises(TrainingInterrupted) as stop:
        trainer.fit()
    assert stop.value.exit_code == 128 + signal.SIGUSR2
    assert handler.calls == [(signal.SIGUSR2, 2)]


def test_sigusr2_without_a_python_handler_saves_and_stops(tmp_path):
    # No submitit: the previous disposition is not a Python handler (SIG_IGN here rather than
    # SIG_DFL, so that a trainer which missed the signal fails the test instead of killing it).
    previous = signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    try:
        trainer = make_trainer(tmp_path, task=_signal_at(3), eval_every=0, ckpt_every=0)
        with pytest.raises(TrainingInterrupted, match="SIGUSR2: stopped at iteration 3/8"):
            trainer.fit()
        assert signal.getsignal(signal.SIGUSR2) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["trainer"]["step"] == 3


def test_the_preemption_signal_follows_submitit_preempt_signal(tmp_path, monkeypatch):
    monkeypatch.setenv("SUBMITIT_PREEMPT_SIGNAL", "USR1")
    calls = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: calls.append(signum))
    try:
        trainer = make_trainer(tmp_path, task=_signal_at(2, signal.SIGUSR1), eval_every=0,
                               ckpt_every=0)
        with pytest.raises(TrainingInterrupted):
            trainer.fit()
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert calls == [signal.SIGUSR1]
    assert (tmp_path / "checkpoints" / "last.pt").exists()


def test_resume_auto_resumes_when_last_pt_exists_and_starts_fresh_otherwise(tmp_path):
    assert resolve_resume("auto", tmp_path) is None
    last = tmp_path / "checkpoints" / "last.pt"
    last.parent.mkdir()
    last.write_bytes(b"")
    assert resolve_resume("auto", tmp_path) == last
    with pytest.raises(FileExistsError, match="resume=true"):
        resolve_resume(False, tmp_path)


@pytest.mark.slow
def test_a_requeued_run_with_resume_auto_continues_from_last_pt(tmp_path):
    run_dir = tmp_path / "run"
    settings = [*TINY, "trainer.eval_every=0", "trainer.ckpt_every=0", "trainer.vis_images=0",
                "resume=auto", f"hydra.run.dir={run_dir}"]
    first = run_cli("train", *settings, "trainer.max_iters=2", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "resumed from" not in first.stdout + first.stderr
    # The requeued job: same run directory (and here a longer schedule to show it continues).
    again = run_cli("train", *settings, "trainer.max_iters=4", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "resumed from" in again.stdout + again.stderr and "at iteration 2" in (
        again.stdout + again.stderr)
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["trainer"]["step"] == 4


def test_a_requeued_sweep_job_resolves_the_same_sweep_directory():
    """submitit pickles the launcher with the sweep's config and, on requeue, unpickles it and
    composes the job's config again (load_sweep_config): `${now:...}` must not move on."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.utils import create_config_search_path
    from hydra.core.utils import setup_globals
    from hydra.types import RunMode

    setup_globals()
    loader = ConfigLoaderImpl(config_search_path=create_config_search_path("pkg://segtrain.conf"))
    master = loader.load_configuration(
        "train", ["hydra.sweep.dir=multirun/${now:%H-%M-%S-%f}", "optimizer.lr=0.1,0.2"],
        RunMode.MULTIRUN,
    )
    submitted = str(master.hydra.sweep.dir)  # the launcher logs it before submitting
    requeued = pickle.loads(pickle.dumps(master))
    job = loader.load_sweep_config(requeued, ["optimizer.lr=0.1"])
    assert str(job.hydra.sweep.dir) == submitted
