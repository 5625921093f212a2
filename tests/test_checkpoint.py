"""Checkpoint files: atomic round trip, safe loading, RNG capture, config and shape checks."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

from segtrain.utils.checkpoint import (
    capture_rng_state,
    load_checkpoint,
    load_model_state,
    restore_rng_state,
    save_checkpoint,
)


def _state(model: nn.Module) -> dict:
    return {"model": model.state_dict(), "config": "seed: 0\n", "step": 3, "rng": capture_rng_state()}


def test_round_trip_restores_weights_and_plain_values(tmp_path):
    model = nn.Linear(3, 2)
    path = save_checkpoint(_state(model), tmp_path / "ckpt" / "last.pt")
    loaded = load_checkpoint(path)
    assert loaded["step"] == 3
    assert torch.equal(loaded["model"]["weight"], model.weight.detach())
    assert not list(path.parent.glob("*.tmp")), "temporary file left behind"


def test_failed_write_keeps_previous_checkpoint(tmp_path):
    path = save_checkpoint(_state(nn.Linear(3, 2)), tmp_path / "last.pt")
    before = path.read_bytes()

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        save_checkpoint({"model": {}, "config": "", "bad": Unpicklable()}, path)
    assert path.read_bytes() == before
    assert not list(tmp_path.glob(".*tmp"))


def test_rng_state_survives_weights_only_round_trip(tmp_path):
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    path = save_checkpoint({"model": {}, "config": "", "rng": capture_rng_state()}, tmp_path / "r.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    restore_rng_state(load_checkpoint(path)["rng"])
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])
    assert random.random() == expected[2]


def test_missing_checkpoint_names_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_checkpoint(tmp_path / "nope.pt")


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    path = save_checkpoint(_state(nn.Linear(3, 2)), tmp_path / "last.pt")
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="cannot load checkpoint .*last.pt"):
        load_checkpoint(path)


def test_bare_state_dict_is_not_taken_for_a_checkpoint(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(nn.Linear(3, 2).state_dict(), path)
    with pytest.raises(ValueError, match="not a segtrain checkpoint"):
        load_checkpoint(path)


def test_class_count_mismatch_names_tensor_and_shapes():
    source = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Conv2d(4, 21, 1))
    target = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Conv2d(4, 6, 1))
    with pytest.raises(ValueError, match=r"1\.weight: checkpoint \(21, 4, 1, 1\) vs model \(6, 4, 1, 1\)"):
        load_model_state(target, source.state_dict(), "checkpoint c.pt")


def test_architecture_mismatch_lists_missing_and_unknown_keys():
    with pytest.raises(ValueError, match="absent.*unknown to the model"):
        load_model_state(nn.Sequential(nn.Linear(2, 2)), {"other.weight": torch.zeros(1)}, "c.pt")
