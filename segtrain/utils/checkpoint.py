"""Checkpoint files: atomic writes, safe loads, RNG state capture and model-state checks."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from segtrain.utils.files import write_atomically

# Callables a checkpoint's embedded config may name; anything else could run foreign code.
ALLOWED_TARGET_PREFIXES = ("segtrain.", "torch.", "torchvision.")


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write `state` with torch.save atomically (see `write_atomically`).

    A crash mid-write leaves the previous file at `path` intact.
    """
    return write_atomically(path, lambda f: torch.save(state, f), binary=True)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load a segtrain checkpoint with `weights_only=True`; clear errors for bad files."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint not found: {path}; expected a file written by `segtrain train`, "
            "e.g. outputs/<date>/<time>/checkpoints/last.pt"
        )
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises several types for truncated or foreign files
        raise ValueError(
            f"cannot load checkpoint {path}: {err.__class__.__name__}: {str(err).splitlines()[0]}. "
            "Expected a segtrain checkpoint (a dict of tensors and plain Python values)."
        ) from err
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise ValueError(
            f"{path} is not a segtrain checkpoint: expected a dict with 'model' and 'config' "
            "entries (a bare state dict can be used as model.weights instead)"
        )
    return state


def check_config_targets(config: Any, source: str) -> None:
    """Refuse a config that names a `_target_` outside segtrain, torch and torchvision.

    A checkpoint found on the internet must not be able to run code through Hydra's instantiate.
    """
    stack = [("", config)]
    while stack:
        where, node = stack.pop()
        if isinstance(node, dict):
            for key, value in node.items():
                path = f"{where}.{key}" if where else str(key)
                if key == "_target_" and not (
                    isinstance(value, str) and value.startswith(ALLOWED_TARGET_PREFIXES)
                ):
                    raise ValueError(
                        f"{source} names _target_={value!r} at '{path}'; a checkpoint's config "
                        f"may only name callables under {', '.join(ALLOWED_TARGET_PREFIXES)} — "
                        "refusing to run code from it"
                    )
                stack.append((path, value))
        elif isinstance(node, list):
            stack.extend((f"{where}[{i}]", v) for i, v in enumerate(node))


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
