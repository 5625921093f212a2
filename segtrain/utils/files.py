"""Atomic file writes (a reader, or a crash, never sees a half-written file), the error a
refused write becomes (StorageError: one message naming the path and the reason), and the checks
a run makes of its disk at start: a write probe, free space, debris of interrupted writes."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


class StorageError(OSError):
    """The file system refused a write: full (ENOSPC, EDQUOT), read-only (EROFS), no permission
    (EACCES, EPERM), an I/O error. A user error, not a bug: `str()` is the whole message, which
    names the path, the reason and what was left intact. `errno` is the refusal's."""

    def __str__(self) -> str:
        return str(self.strerror)


def os_error_in(err: BaseException) -> OSError | None:
    """The OSError behind `err`: itself, or one it was raised from or while handling.

    torch.save reports a failed write as a RuntimeError ("unexpected pos ...") whose context is
    the OSError (ENOSPC) the file object raised.
    """
    seen: set[int] = set()
    node: BaseException | None = err
    while node is not None and id(node) not in seen:
        if isinstance(node, OSError) and node.errno is not None:
            return node
        seen.add(id(node))
        node = node.__cause__ or node.__context__
    return None


def write_atomically(path: str | os.PathLike, write: Callable[[IO[Any]], None], binary: bool) -> Path:
    """Call `write(f)` on a temporary file beside `path`, fsync it, rename it over `path`.

    Creates the parent directory. On any failure the temporary file is removed and the previous
    file at `path` is left intact; after success the rename itself is made durable. A write the
    file system refuses (full, read-only, ...) raises StorageError "cannot write PATH: reason".
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise _refused(err, path) from err
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        # Where even that fails (the file system went read-only), the run's next start does it.
        with contextlib.suppress(OSError):
            Path(tmp).unlink(missing_ok=True)
        refused = os_error_in(err) if isinstance(err, Exception) else None
        if refused is not None:
            raise _refused(refused, path) from err
        raise
    if hasattr(os, "O_DIRECTORY"):  # POSIX: fsync the folder so the rename survives a crash
        try:
            dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as err:
            raise _refused(err, path) from err
    return path


def _refused(err: OSError, path: Path) -> StorageError:
    if isinstance(err, StorageError):
        return err
    return StorageError(err.errno, f"cannot write {path}: {err.strerror or err}")


def remove_temp_files(directory: Path) -> list[tuple[Path, int]]:
    """Remove the temporary files `write_atomically` leaves behind when its process dies
    mid-write (`.NAME.*.tmp`) from `directory`; returns (path, size in bytes) of each.

    Only where no other process writes (its caller holds the directory's lock): every such file
    then belongs to a writer that is gone.
    """
    removed = []
    for tmp in sorted(directory.glob(".*.tmp")) if directory.is_dir() else []:
        try:
            size = tmp.stat().st_size
            tmp.unlink()
        except (FileNotFoundError, IsADirectoryError, PermissionError):
            continue
        removed.append((tmp, size))
    return removed


def probe_writes(directory: Path, size: int = 64 * 2**10) -> None:
    """Create `directory` if missing, then create, write (`size` bytes: enough for the file
    system to allocate blocks), fsync and remove a file in it; OSError when it refuses."""
    directory.mkdir(parents=True, exist_ok=True)
    probe = directory / f".write-probe.{os.getpid()}.tmp"  # a leftover is a temporary file too
    try:
        with open(probe, "wb") as f:
            f.write(bytes(size))
            f.flush()
            os.fsync(f.fileno())
    finally:
        with contextlib.suppress(OSError):
            probe.unlink(missing_ok=True)


def free_bytes(directory: Path) -> int | None:
    """Bytes this process may still write on `directory`'s file system (None: not reported)."""
    stats = os.statvfs(directory)
    if stats.f_blocks == 0:  # pseudo and some network file systems report no sizes
        return None
    blocks = stats.f_bfree if os.geteuid() == 0 else stats.f_bavail  # root may use the reserve
    return blocks * stats.f_frsize


def load_json(path: str | os.PathLike, what: str) -> Any:
    """Parsed JSON; FileNotFoundError / ValueError naming the file and what it should be."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{what} file {path} is not valid JSON: {err}") from None
