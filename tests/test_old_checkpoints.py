"""Checkpoints written by an earlier main still load and evaluate to the numbers they gave then
(tests/fixtures/old_checkpoints: their stored `_target_`s name modules that have since moved)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import ROOT, run_cli

from segtrain.config_trust import read_stored_config
from segtrain.config_upgrade import MOVED_MODULES, upgrade_target

OLD = ROOT / "tests" / "fixtures" / "old_checkpoints"
CHECKPOINTS = sorted(OLD.glob("*.pt"))


@pytest.mark.parametrize("ckpt", CHECKPOINTS, ids=lambda p: p.stem)
def test_old_checkpoint_evaluates_to_the_metrics_it_gave_when_written(ckpt, tmp_path):
    copy = tmp_path / ckpt.name  # eval must not need (or touch) the fixture's folder
    shutil.copy(ckpt, copy)
    run = run_cli("eval", f"ckpt={copy}", "data.num_workers=0", f"output={tmp_path / 'out'}",
                  cwd=tmp_path, timeout=180)
    assert run.returncode == 0, run.stderr
    got = json.loads((tmp_path / "out" / "metrics.json").read_text())
    expected = json.loads(ckpt.with_suffix(".metrics.json").read_text())
    assert _recorded_part(got, expected) == expected


def _recorded_part(got, expected):
    """`got` restricted to the keys the fixture recorded: metrics added since (e.g. mDice) are
    new numbers, not changed ones; every recorded number must still be equal."""
    if isinstance(expected, dict) and isinstance(got, dict):
        return {k: _recorded_part(got[k], v) if k in got else None for k, v in expected.items()}
    return got


@pytest.mark.parametrize("ckpt", CHECKPOINTS, ids=lambda p: p.stem)
def test_old_checkpoint_names_moved_modules_and_reading_renames_them(ckpt):
    text = torch.load(ckpt, map_location="cpu", weights_only=True)["config"]
    assert any(f"_target_: {old}." in text for old in MOVED_MODULES), "the fixture predates the move"
    cfg = read_stored_config(text, str(ckpt))
    targets = [v for k, v in _items(cfg) if k.endswith("_target_")]
    assert targets and not any(t.rpartition(".")[0] in MOVED_MODULES for t in targets)


def test_upgrade_renames_only_exact_moved_modules():
    old, new = next(iter(MOVED_MODULES.items()))
    assert upgrade_target(f"{old}.Thing") == f"{new}.Thing"
    assert upgrade_target(f"{old}_extra.Thing") == f"{old}_extra.Thing"
    assert upgrade_target("torch.optim.AdamW") == "torch.optim.AdamW"


def _items(cfg, prefix=""):
    from omegaconf import DictConfig, ListConfig

    if isinstance(cfg, DictConfig):
        for key in cfg:
            value = cfg._get_node(key)
            if isinstance(value, (DictConfig, ListConfig)):
                yield from _items(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", value._value()
    elif isinstance(cfg, ListConfig):
        for i, value in enumerate(cfg):
            yield from _items(value, f"{prefix}{i}.")
