"""Checkpoint files: atomic writes, safe loads, RNG state capture and model-state checks."""

from __future__ import annotations

import contextlib
import errno
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from segtrain.utils.files import StorageError, write_atomically

# What to do about a refused checkpoint write, by errno.
_REMEDIES = {errno.ENOSPC: "free some space on that disk", errno.EDQUOT: "free some of your quota",
             errno.EROFS: "make that file system writable again",
             errno.EACCES: "make the directory writable", errno.EPERM: "make the directory writable"}


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write `state` with torch.save atomically (see `write_atomically`).

    A crash mid-write leaves the previous file at `path` intact. A write the file system refuses
    raises StorageError, e.g. "cannot write checkpoint PATH: No space left on device; the
    previous last.pt is intact (step 400). ..."
    """
    path = Path(path)
    try:
        return write_atomically(path, lambda f: torch.save(state, f), binary=True)
    except StorageError as err:
        reason = os.strerror(err.errno) if err.errno else str(err)
        step = read_trainer_state(path).get("step")
        kept = (f"the previous {path.name} is intact (step {step}); " if step is not None else
                f"no complete {path.name} was there before; ")
        remedy = _REMEDIES.get(err.errno, "fix the cause")
        then = "continue from it with resume=true" if step is not None else "start again"
        raise StorageError(err.errno, f"cannot write checkpoint {path}: {reason}; {kept}"
                                      f"{remedy}, then {then}") from err


def read_trainer_state(path: str | os.PathLike) -> dict[str, Any]:
    """The trainer state (step, best_value, ...) stored in the checkpoint at `path`; {} when
    there is no readable one. Memory-mapped: the weights are not read, so this stays cheap for
    large models."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["trainer"]
    except Exception:  # noqa: BLE001 - absent, truncated or foreign: nothing to report
        return {}
    return state if isinstance(state, dict) else {}


def link_checkpoint(source: Path, link: Path) -> None:
    """Make `link` the same checkpoint as `source`: a hard link (no bytes written), or a copy
    where the file system has no hard links. The earlier file at `link` is replaced atomically:
    a failure leaves it intact."""
    tmp = link.with_name(f".{link.name}.{os.getpid()}.tmp")  # a leftover is removed at start
    try:
        tmp.unlink(missing_ok=True)
        os.link(source, tmp)
        os.replace(tmp, link)
        return
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
    with open(source, "rb") as src:
        write_atomically(link, lambda f: shutil.copyfileobj(src, f), binary=True)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load a segtrain checkpoint with `weights_only=True`; clear errors for bad files."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint not found: {path}; expected a file written by `segtrain train`, "
            "e.g. outputs/<date>/<time>/checkpoints/last.pt"
        )
    if path.stat().st_size == 0:
        raise ValueError(f"checkpoint {path} is empty (0 bytes): its write never completed; use "
                         "another checkpoint of the run (best.pt, iter_*.pt) or retrain")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises several types for truncated or foreign files
        first_line = next(iter(str(err).splitlines()), "")
        raise ValueError(
            f"cannot load checkpoint {path}: {err.__class__.__name__}: {first_line}. "
            "Expected a segtrain checkpoint (a dict of tensors and plain Python values)."
        ) from err
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise ValueError(
            f"{path} is not a segtrain checkpoint: expected a dict with 'model' and 'config' "
            "entries (a bare state dict can be used as model.weights instead)"
        )
    return state


def capture_rng_state() -> dict[str, Any]:
    """RNG states of torch (CPU and CUDA), NumPy and Python as tensors and plain values.

    NumPy's state is stored as a uint32 tensor plus ints: `weights_only` loading refuses ndarrays.
    """
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.uint32).view(np.int32).copy()),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {"version": version, "state": list(py_state), "gauss": gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of `capture_rng_state`."""
    torch.set_rng_state(state["torch"].cpu())
    np_state = state["numpy"]
    keys = np_state["keys"].numpy().view(np.uint32)
    np.random.set_state(
        ("MT19937", keys, np_state["pos"], np_state["has_gauss"], np_state["cached_gaussian"])
    )
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_model_state(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Load weights strictly, explaining architecture or class-count mismatches in one message."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state_dict.items()
        if k in own and v.shape != own[k].shape
    ]
    if not (missing or unexpected or mismatched):
        model.load_state_dict(state_dict)
        return
    parts = []
    if mismatched:
        parts.append(f"{len(mismatched)} tensors differ in shape (e.g. {'; '.join(mismatched[:3])})")
    if missing:
        parts.append(f"{len(missing)} model tensors are absent (e.g. {', '.join(missing[:3])})")
    if unexpected:
        parts.append(f"{len(unexpected)} are unknown to the model (e.g. {', '.join(unexpected[:3])})")
    raise ValueError(
        f"{source} does not fit the configured model: {'; '.join(parts)}. The checkpoint was "
        "written for another architecture or class count; check model=... and "
        "dataset.num_classes against the run that wrote it."
    )
