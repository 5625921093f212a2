"""Nothing lost when something fails late: the run directory is locked, a fresh run never starts
over an earlier run's work, debris of dead writers is removed, and a disk that refuses writes is
named in one paragraph while the previous checkpoint stays intact."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
from conftest import TINY, run_cli

from segtrain.utils.checkpoint import load_checkpoint


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under `folder`: (bytes, mtime in ns)."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_paragraph_error(stderr: str) -> str:
    """The `error: ...` paragraph the command printed, checked to come without a traceback."""
    assert "Traceback" not in stderr and "HYDRA_FULL_ERROR" not in stderr, stderr
    assert stderr.startswith("error: ") or "\nerror: " in stderr, stderr
    return stderr[stderr.find("error: "):]


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


# ------------------------------------------------------------------------------ the run lock
@pytest.mark.slow
def test_a_second_train_in_a_running_runs_directory_is_refused_and_changes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    long_run = [*TINY, "trainer.max_iters=100000", "trainer.eval_every=0", "trainer.ckpt_every=0",
                "trainer.log_every=1", "trainer.vis_images=0", f"hydra.run.dir={run_dir}"]
    first = subprocess.Popen(
        [sys.executable, "-m", "segtrain", "train", *long_run], cwd=tmp_path,
        env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    try:
        for line in first.stdout:  # under way: locked, configured, its stop handler installed
            if "iter 1/100000" in line:
                break
        before = _snapshot(run_dir / ".hydra")
        lock = json.loads((run_dir / ".segtrain.lock").read_text())
        assert lock["pid"] == first.pid

        second = run_cli("train", *TINY, f"hydra.run.dir={run_dir}", cwd=tmp_path)

        assert second.returncode == 1, second.stdout + second.stderr
        message = _one_paragraph_error(second.stderr)
        assert f"{run_dir} is in use by another segtrain run: pid {first.pid} on host " \
               f"{lock['host']}, started {lock['started']}" in message
        assert _snapshot(run_dir / ".hydra") == before
        assert json.loads((run_dir / ".segtrain.lock").read_text()) == lock
        assert not (run_dir / "checkpoints" / "last.pt").exists()
    finally:
        os.killpg(first.pid, signal.SIGTERM)
        output = first.stdout.read()
        code = first.wait(timeout=120)
    assert code == 128 + signal.SIGTERM, output
    assert not (run_dir / ".segtrain.lock").exists()  # released on the way out
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["trainer"]["step"] >= 1


@pytest.mark.slow
def test_a_dead_runs_lock_and_half_written_checkpoint_are_explained_and_cleaned_up(tmp_path):
    """A requeued job (resume=auto) whose first attempt was killed -9 during its first checkpoint
    write: its lock file and temporary file are still there."""
    run_dir = tmp_path / "run"
    pid = _dead_pid()
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / ".segtrain.lock").write_text(json.dumps(
        {"pid": pid, "host": "node-7", "started": "2024-05-01 12:00:00", "command": "segtrain train"}))
    half_written = run_dir / "checkpoints" / ".last.pt.k3j2h1g0.tmp"
    half_written.write_bytes(bytes(2**20))

    result = run_cli("train", *TINY, "trainer.max_iters=3", "resume=auto",
                     f"hydra.run.dir={run_dir}", cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    taken_over = (f"{run_dir / '.segtrain.lock'} was left by pid {pid} on host node-7 at "
                  "2024-05-01 12:00:00, which is no longer running: taking it over")
    removed = f"removed {half_written} (1.0 MiB)"
    log = (run_dir / "train.log").read_text()
    assert taken_over in result.stdout and taken_over in log
    assert removed in result.stdout and removed in log
    assert not half_written.exists() and not (run_dir / ".segtrain.lock").exists()
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["trainer"]["step"] == 3


# -------------------------------------------------------------------- an earlier run's work
@pytest.mark.slow
@pytest.mark.parametrize("earlier", ["checkpoints/best.pt", "checkpoints/iter_0000200.pt",
                                     "checkpoints/last.pt", "metrics.json"])
def test_a_fresh_run_over_an_earlier_runs_work_is_refused_before_anything_is_written(
    tmp_path, earlier
):
    run_dir = tmp_path / "run"
    for name, text in ((".hydra/config.yaml", "the earlier run's config\n"), ("train.log", "x\n"),
                       (earlier, "earlier work")):
        (run_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (run_dir / name).write_text(text)
        os.utime(run_dir / name, ns=(10**18, 10**18))
    before = _snapshot(run_dir)

    result = run_cli("train", *TINY, f"hydra.run.dir={run_dir}", cwd=tmp_path)

    assert result.returncode == 1, result.stdout + result.stderr
    message = _one_paragraph_error(result.stderr)
    assert f"{run_dir} already holds" in message and earlier in message
    assert "nothing was written" in message
    assert ("resume=true" in message) == (earlier == "checkpoints/last.pt")
    assert _snapshot(run_dir) == before  # .hydra/ byte-identical, mtimes too; no lock, no log line


def test_one_rule_decides_when_a_directory_holds_an_earlier_run(tmp_path):
    """`resume` false/auto/path and the CLI's early refusal share `earlier_run_files`."""
    from segtrain.train import resolve_resume

    run_dir = tmp_path / "run"
    assert resolve_resume(False, run_dir) is None and resolve_resume("auto", run_dir) is None
    best = run_dir / "checkpoints" / "best.pt"
    best.parent.mkdir(parents=True)
    best.write_bytes(b"")
    (run_dir / "checkpoints" / ".last.pt.abc.tmp").write_bytes(b"")  # debris is not work
    for resume in (False, "auto"):  # no last.pt to resume: a fresh start would overwrite best.pt
        with pytest.raises(FileExistsError, match=r"already holds a checkpoint .*best\.pt"):
            resolve_resume(resume, run_dir)
    assert resolve_resume(str(best), run_dir) == best  # a rollback inside the run: allowed
    elsewhere = tmp_path / "other.pt"
    elsewhere.write_bytes(b"")
    with pytest.raises(FileExistsError, match="would overwrite"):  # another run's checkpoint here
        resolve_resume(str(elsewhere), run_dir)


# ----------------------------------------------------------------------- a disk that refuses
@pytest.mark.slow
def test_a_run_directory_that_cannot_be_written_is_refused_in_one_paragraph(tmp_path):
    (tmp_path / "a_file").write_text("not a directory")
    run_dir = tmp_path / "a_file" / "run"

    result = run_cli("train", *TINY, f"hydra.run.dir={run_dir}", cwd=tmp_path)

    assert result.returncode == 1
    message = _one_paragraph_error(result.stderr)
    assert f"cannot write to {run_dir}: Not a directory" in message
    assert (tmp_path / "a_file").read_text() == "not a directory"


def test_a_full_disk_is_refused_at_start_and_leaves_nothing_behind(tmp_path, monkeypatch):
    from segtrain.engine import run_dir as guard
    from segtrain.utils.files import StorageError

    stats = os.statvfs(tmp_path)
    full = os.statvfs_result((*stats[:3], 0, 0, *stats[5:]))  # f_bfree = f_bavail = 0
    monkeypatch.setattr(guard.os, "statvfs", lambda path: full)
    run_dir = tmp_path / "run"
    try:
        with pytest.raises(StorageError) as refused:
            guard.claim_run_dir(run_dir, training=True, resume=False)
    finally:
        guard.release_all()
    assert refused.value.errno == errno.ENOSPC
    assert str(refused.value).startswith(f"{run_dir / 'checkpoints'} has 0.0 KiB free, less than")
    assert not run_dir.exists()  # no lock file, no empty folders


@pytest.fixture
def refusing_disk(monkeypatch):
    """refusing_disk(kind): from now on, atomic writes hit a full disk (writes go to /dev/full,
    whose every write fails with ENOSPC, as a full disk's do) or a read-only file system."""

    def refuse(kind: str) -> None:
        real = tempfile.mkstemp

        def mkstemp(*args, **kwargs):
            if kind == "read-only":
                raise OSError(errno.EROFS, os.strerror(errno.EROFS))
            fd, name = real(*args, **kwargs)
            os.close(fd)
            return os.open("/dev/full", os.O_WRONLY), name

        monkeypatch.setattr(tempfile, "mkstemp", mkstemp)

    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full (Linux)")
    return refuse


@pytest.mark.parametrize("kind, reason, remedy", [
    ("full", "No space left on device", "free some space on that disk"),
    ("read-only", "Read-only file system", "make that file system writable again"),
])
def test_a_refused_checkpoint_write_keeps_the_previous_last_pt_and_says_so(
    tmp_path, refusing_disk, kind, reason, remedy
):
    from test_trainer import make_trainer

    from segtrain.cli import USER_ERRORS

    trainer = make_trainer(tmp_path, max_iters=4, eval_every=0, ckpt_every=4)
    trainer.fit()
    last = tmp_path / "checkpoints" / "last.pt"
    before = _snapshot(last.parent)
    trainer.state.step = 5
    refusing_disk(kind)

    with pytest.raises(OSError) as refused:
        trainer.save(best=True)

    assert isinstance(refused.value, USER_ERRORS)  # one paragraph from the CLI, no traceback
    assert str(refused.value) == (
        f"cannot write checkpoint {last}: {reason}; the previous last.pt is intact (step 4); "
        f"{remedy}, then continue from it with resume=true")
    assert _snapshot(last.parent) == before  # last.pt, best.pt, iter_0000004.pt; no temp file


@pytest.mark.slow
def test_a_disk_that_fills_up_during_training_stops_it_in_one_paragraph(tmp_path):
    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full (Linux)")
    run_dir = tmp_path / "run"
    # The disk fills up after the first checkpoint: later writes of last.pt hit /dev/full.
    code = textwrap.dedent("""
        import os, sys, tempfile
        real, writes = tempfile.mkstemp, []
        def mkstemp(*args, **kwargs):
            fd, name = real(*args, **kwargs)
            if kwargs.get("prefix") == ".last.pt.":
                writes.append(name)
                if len(writes) > 1:
                    os.close(fd)
                    fd = os.open("/dev/full", os.O_WRONLY)
            return fd, name
        tempfile.mkstemp = mkstemp
        from segtrain.cli import main
        sys.exit(main(sys.argv[1:]))
    """)
    result = subprocess.run(
        [sys.executable, "-c", code, "train", *TINY, "trainer.max_iters=6", "trainer.eval_every=0",
         "trainer.ckpt_every=3", f"hydra.run.dir={run_dir}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={k: v for k, v in os.environ.items() if k not in ("SEGTRAIN_DEBUG", "HYDRA_FULL_ERROR")},
    )

    assert result.returncode == 1, result.stdout + result.stderr
    last = run_dir / "checkpoints" / "last.pt"
    message = _one_paragraph_error(result.stderr)
    assert (f"cannot write checkpoint {last}: No space left on device; the previous last.pt is "
            "intact (step 3)") in message
    assert load_checkpoint(last)["trainer"]["step"] == 3
    assert not list(last.parent.glob(".*.tmp")) and not (run_dir / ".segtrain.lock").exists()
