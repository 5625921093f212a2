"""The run directory's guard: one job at a time in it (an advisory lock), no fresh start over an
earlier run's work, no stale temporary files, a disk that takes writes — settled before Hydra
writes anything there."""

from __future__ import annotations

import atexit
import contextlib
import errno
import json
import logging
import os
import socket
import sys
import traceback
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from segtrain.config_check import ConfigValueError
from segtrain.utils.distributed import broadcast_object, get_rank, is_distributed
from segtrain.utils.files import StorageError, free_bytes, probe_writes, remove_temp_files

try:
    import fcntl
except ImportError:  # not POSIX: runs go unlocked (noted in the log)
    fcntl = None

log = logging.getLogger("segtrain.run_dir")

LOCK_NAME = ".segtrain.lock"
MIN_FREE_BYTES = 16 * 2**20  # less than this free and a run cannot even keep its log and events


# ------------------------------------------------------------------------ an earlier run's work
def earlier_run_files(run_dir: Path) -> list[Path]:
    """The files by which `run_dir` holds an earlier run's work: its checkpoints (every `*.pt`
    under checkpoints/: last.pt, best.pt, iter_*.pt) and its final metrics.json.

    `.hydra/`, the log and TensorBoard events are not: a run that stopped before its first
    checkpoint can be started again in its directory.
    """
    ckpt_dir = run_dir / "checkpoints"
    found = sorted(p for p in ckpt_dir.glob("*.pt") if p.is_file()) if ckpt_dir.is_dir() else []
    metrics = run_dir / "metrics.json"
    return found + ([metrics] if metrics.is_file() else [])


def resolve_resume(resume: Any, run_dir: Path) -> Path | None:
    """Checkpoint to resume from; refuse to start afresh over an earlier run's work.

    resume: false | true (run_dir's checkpoints/last.pt, which must exist) | "auto" (that file
    when it exists, else a fresh start: what a requeued SLURM job needs) | a path to a .pt.
    A fresh start (false, or auto without last.pt) refuses a directory holding any of
    `earlier_run_files`, and so does a path outside `run_dir`: it would continue another run
    over this one's files.
    """
    run_dir = Path(run_dir)
    last = run_dir / "checkpoints" / "last.pt"
    if resume == "auto" and last.is_file():
        return last
    if resume is False or resume is None or resume == "auto":
        _refuse_earlier_run(run_dir, "a fresh run")
        return None
    path = last if resume is True else Path(str(resume))
    if not path.is_file():
        shown = str(resume).lower() if isinstance(resume, bool) else resume
        raise FileNotFoundError(
            f"resume={shown}: no checkpoint at {path}; expected checkpoints/last.pt of an "
            "earlier run (pass hydra.run.dir=<that run's directory> with resume=true)"
        )
    if not path.absolute().is_relative_to(run_dir.absolute()):
        _refuse_earlier_run(run_dir, f"continuing {path} in it")
    return path


def _refuse_earlier_run(run_dir: Path, starting: str) -> None:
    """FileExistsError naming the earlier run's files in `run_dir`, if there are any."""
    earlier = earlier_run_files(run_dir)
    if not earlier:
        return
    names = [str(p.relative_to(run_dir)) for p in earlier]
    listed = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    checkpoints = [name for name in names if name.endswith(".pt")]
    if "checkpoints/last.pt" in names:
        how = "Pass resume=true to continue that run"
    elif checkpoints:
        how = f"Pass resume={run_dir / checkpoints[-1]} to continue from that checkpoint"
    else:
        how = "Move them away to start again there"
    what = "a checkpoint" if checkpoints else "the final metrics"
    raise FileExistsError(
        f"{run_dir} already holds {what} from an earlier run ({listed}); {starting} would "
        f"overwrite it. {how}, or choose another hydra.run.dir (nothing was written)"
    )


# ------------------------------------------------------------------------------------ the lock
@dataclass
class RunDirLock:
    """RUN_DIR/.segtrain.lock, held with flock for the whole job: the kernel frees it when the
    process ends, however it ends. The file names its owner (pid, host, start, command) for the
    message a second process gets; a lock file that nobody holds was left by a process that died.
    """

    path: Path
    fd: int
    pid: int
    unlocked_reason: str | None = None  # the file system offers no flock: the run goes unguarded

    @classmethod
    def acquire(cls, run_dir: Path) -> tuple[RunDirLock, dict | None]:
        """Lock `run_dir` (created if missing). Returns the lock and, when it took over a lock
        file left by a dead process, that process's record. FileExistsError when a running
        process holds it; StorageError when the directory takes no writes."""
        path = run_dir / LOCK_NAME
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise _cannot_write(run_dir, err) from err
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as err:
                raise _cannot_write(run_dir, err) from err
            unlocked_reason = None
            try:
                if fcntl is None:
                    raise OSError(0, "no fcntl module on this platform")
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = _read_owner(fd)
                os.close(fd)
                raise FileExistsError(_busy_message(run_dir, path, owner)) from None
            except OSError as err:  # e.g. Lustre mounted without flock: ENOSYS
                unlocked_reason = err.strerror or str(err)
            # The owner may have removed the file between our open and our flock: try again.
            if unlocked_reason or _same_file(fd, path):
                break
            os.close(fd)
        lock = cls(path, fd, os.getpid(), unlocked_reason)
        previous = None if unlocked_reason else _read_owner(fd)
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": datetime.now().isoformat(sep=" ", timespec="seconds"),
                  "command": " ".join(sys.argv)}
        try:  # writing the owner's record is the run directory's write probe too
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
            os.fsync(fd)
        except OSError as err:
            lock.release()
            raise _cannot_write(run_dir, err) from err
        return lock, previous

    def release(self) -> None:
        """Remove the lock file and unlock; only in the process that locked (not in a forked
        loader worker, which shares the descriptor)."""
        if self.fd < 0 or os.getpid() != self.pid:
            return
        try:
            if _same_file(self.fd, self.path):
                self.path.unlink()
        except OSError:  # the next run takes the file over
            pass
        os.close(self.fd)
        self.fd = -1


def _same_file(fd: int, path: Path) -> bool:
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)


def _read_owner(fd: int) -> dict | None:
    """The record in a lock file; None when it is empty (released, or never written)."""
    text = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
    if not text:
        return None
    try:
        record = json.loads(text)
    except ValueError:
        record = None
    return record if isinstance(record, dict) else {"command": text[:200]}


def _owner(record: dict | None) -> str:
    record = record or {}
    text = (f"pid {record.get('pid', '?')} on host {record.get('host', '?')}, "
            f"started {record.get('started', '?')}")
    command = str(record.get("command") or "")
    command = command if len(command) <= 160 else command[:157] + "..."
    return f"{text} ({command})" if command else text


def _busy_message(run_dir: Path, path: Path, owner: dict | None) -> str:
    return (
        f"{run_dir} is in use by another segtrain run: {_owner(owner)}. Two runs in one "
        "directory would overwrite each other's checkpoints and metrics: wait until it ends (or "
        f"stop it), or choose another hydra.run.dir (nothing was written; the lock is {path})"
    )


def _cannot_write(directory: Path, err: OSError) -> StorageError:
    reason = err.strerror or str(err)
    return StorageError(
        err.errno, f"cannot write to {directory}: {reason}; a run needs a directory it can create "
                   "files in: choose another hydra.run.dir or fix that one (nothing was written)"
    )


# ---------------------------------------------------------------------------- disk and debris
def check_disk(directory: Path, checkpoint_bytes: int | None = None) -> str | None:
    """Probe `directory` (created if missing) with a small write, and compare its free space
    with one checkpoint (`checkpoint_bytes`, when known) or MIN_FREE_BYTES. StorageError when it
    takes no writes or has less; a note for the log when there is room for one checkpoint but
    not two (the next write needs its own room while the previous last.pt, which best.pt and
    the snapshots share, still exists)."""
    try:
        probe_writes(directory)
        free = free_bytes(directory)
    except OSError as err:
        raise _cannot_write(directory, err) from err
    if free is None:
        return None
    need = max(MIN_FREE_BYTES, checkpoint_bytes or 0)
    if free < need:
        what = f"one checkpoint ({_size(need)})" if need == checkpoint_bytes else _size(need)
        raise StorageError(errno.ENOSPC, (
            f"{directory} has {_size(free)} free, less than {what}: the run would fail at its "
            "next checkpoint. Free some space there or choose another hydra.run.dir (nothing "
            "was written)"))
    if checkpoint_bytes and free < 2 * checkpoint_bytes:
        return (f"{directory} has {_size(free)} free, room for one more checkpoint "
                f"({_size(checkpoint_bytes)}) but not two: free some space before the run ends")
    return None


def _removed_notes(directory: Path) -> list[str]:
    """Remove the temporary files of interrupted writes from `directory` (see
    `remove_temp_files`: safe once the run directory's lock is held); one log line each."""
    return [f"removed {path} ({_size(size)}), the temporary file of a write that never finished "
            "(its process was killed or crashed mid-write)" for path, size in remove_temp_files(directory)]


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


# ----------------------------------------------------------------------------------- the claim
@dataclass
class RunDirClaim:
    """This process's hold on a run directory: the lock (rank 0 only), the checkpoint to resume
    from, and notes for the log (logged once the job's logging is set up)."""

    run_dir: Path
    lock: RunDirLock | None
    resume_from: Path | None = None
    notes: list[str] = field(default_factory=list)
    for_task: bool = False  # made by the callback before the job, for its task to take over

    def log_notes(self) -> None:
        for note in self.notes:
            log.warning(note)
        self.notes.clear()


_claims: dict[Path, RunDirClaim] = {}
_release_at_exit = False


def claim_run_dir(run_dir: str | os.PathLike, training: bool, resume: Any = False,
                  for_task: bool = False) -> RunDirClaim:
    """Take `run_dir` for this job before anything is written there. `for_task`: a claim made
    ahead of the job (the callback), which the job's own call then receives as it is; any other
    claim this process still holds on `run_dir` (an earlier job's) is released and made afresh.

    Rank 0, the rank that writes: locks it (FileExistsError naming the owner when a running
    process holds it; a dead process's lock file is taken over), checks that it takes writes
    (StorageError). For training also: resolves `resume` (see `resolve_resume`: FileExistsError
    for a fresh start over an earlier run's work), removes stale temporary files from
    checkpoints/ and probes that folder and its free space. Under DDP the other ranks get rank
    0's outcome: every rank raises its error, or every rank has its `resume_from`.
    """
    global _release_at_exit
    run_dir = Path(os.path.abspath(run_dir))
    held = _claims.get(run_dir)
    if held is not None and held.for_task and not for_task:
        held.for_task = False
        return held
    if held is not None:
        release_run_dir(run_dir)
    claim, error = None, None
    if get_rank() == 0:
        try:
            claim = _claim(run_dir, training, resume)
        except Exception as err:  # noqa: BLE001 - other ranks stop with it too (below)
            error = err
    if is_distributed():
        shared = error if error is None or isinstance(error, OSError) else RuntimeError(
            f"rank 0 could not claim {run_dir}: {type(error).__name__}: {error}")
        resume_from, shared = broadcast_object((claim.resume_from if claim else None, shared))
        if get_rank() != 0:
            claim, error = RunDirClaim(run_dir, None, resume_from), shared
    if error is not None:
        raise error
    if not _release_at_exit:
        atexit.register(release_all)
        _release_at_exit = True
    claim.for_task = for_task
    _claims[run_dir] = claim
    return claim


def _claim(run_dir: Path, training: bool, resume: Any) -> RunDirClaim:
    created = not run_dir.exists()
    lock, previous = RunDirLock.acquire(run_dir)
    claim = RunDirClaim(run_dir, lock)
    try:
        if previous is not None:
            claim.notes.append(
                f"{lock.path} was left by pid {previous.get('pid', '?')} on host "
                f"{previous.get('host', '?')} at {previous.get('started', '?')}, which is no "
                "longer running: taking it over")
        if lock.unlocked_reason:
            claim.notes.append(f"cannot lock {lock.path} ({lock.unlocked_reason}): a second run "
                               "started in this directory would not be refused")
        if training:
            claim.resume_from = resolve_resume(resume, run_dir)
            ckpt_dir = run_dir / "checkpoints"
            claim.notes += _removed_notes(ckpt_dir)
            size = claim.resume_from.stat().st_size if claim.resume_from else None
            claim.notes += filter(None, [check_disk(ckpt_dir, size)])
        else:
            claim.notes += filter(None, [check_disk(run_dir)])
    except BaseException:
        lock.release()
        for folder in [run_dir / "checkpoints", run_dir] if created else []:
            with contextlib.suppress(OSError):  # a refused run leaves no empty directory behind
                folder.rmdir()
        raise
    return claim


def release_run_dir(run_dir: str | os.PathLike) -> None:
    """Give up this process's claim on `run_dir` (the lock file is removed), if it has one."""
    claim = _claims.pop(Path(os.path.abspath(run_dir)), None)
    if claim is not None and claim.lock is not None:
        claim.lock.release()


def release_all() -> None:
    """Release every claim (at exit: a job that ended by sys.exit never reached on_job_end)."""
    for run_dir in list(_claims):
        release_run_dir(run_dir)


# -------------------------------------------------------------------------------- the callback
class RunDirGuard(Callback):
    """Claims the run directory of `segtrain train` and `segtrain eval` (see `claim_run_dir`) in
    on_run_start: before Hydra's run_job creates the directory, writes `.hydra/` and opens the
    log file. A refusal prints one paragraph and exits with status 1, nothing written.

    Hydra has no hook between a multirun job's start and its `.hydra/` files, so a sweep job is
    claimed by `train()` itself (the same call; a second call returns the claim). The claim's
    notes are logged once the job's logging is set up, and the lock is released as the job ends.
    """

    COMMANDS = ("train", "eval")

    def on_run_start(self, config: DictConfig, config_name: str | None = None, **kwargs: Any) -> None:
        if config_name not in self.COMMANDS:
            return
        training = config_name == "train"
        # Exactly the directory run_job will use: it sets HydraConfig (the pattern may read
        # ${hydra:...}) and takes the absolute path of hydra.run.dir (`now` is cached).
        HydraConfig.instance().set_config(config)
        run_dir = os.path.abspath(str(OmegaConf.select(config, "hydra.run.dir")))
        try:
            resume = OmegaConf.select(config, "resume", default=False) if training else None
        except Exception:  # noqa: BLE001 - a bad value is reported by train() itself
            return
        try:
            if training:  # a wrong value is reported before anything is written, too
                from segtrain.config_check import check_config

                check_config(config)
            claim_run_dir(run_dir, training, resume, for_task=True)
        except (FileExistsError, FileNotFoundError, StorageError, ConfigValueError) as err:
            # Hydra turns a callback's exception into a warning and runs the job: exit here.
            if get_rank() == 0:
                if os.environ.get("SEGTRAIN_DEBUG") or os.environ.get("HYDRA_FULL_ERROR"):
                    traceback.print_exc()
                print(f"error: {err}", file=sys.stderr)
            sys.exit(1)

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        claim = _claims.get(Path(str(config.hydra.runtime.output_dir)))
        if claim is not None:
            claim.log_notes()

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        release_run_dir(str(config.hydra.runtime.output_dir))
