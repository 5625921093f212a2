"""Shared fixtures: real configs composed with hydra.compose and shrunk to run in seconds on CPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT.parent / "shared" / "fixtures"

# A run small enough for a test: 64-pixel synthetic images, a narrow U-Net, a few iterations.
TINY = [
    "dataset.train.num_samples=32",
    "dataset.val.num_samples=8",
    "dataset.train.image_size=64",
    "dataset.val.image_size=64",
    "model.base_channels=8",
    "model.depth=3",
    "data.batch_size=4",
    "data.num_workers=0",
    "trainer.max_iters=6",
    "trainer.eval_every=3",
    "trainer.ckpt_every=3",
    "trainer.log_every=2",
    "trainer.device=cpu",
    "trainer.vis_images=2",
]


@pytest.fixture
def compose_cfg():
    """compose_cfg(config_name, overrides) -> DictConfig with hydra's runtime set up."""

    def _compose(config_name: str = "train", overrides: list[str] | None = None):
        GlobalHydra.instance().clear()
        with initialize_config_module(config_module="segtrain.conf", version_base="1.3"):
            return compose(config_name, overrides=overrides or [], return_hydra_config=False)

    yield _compose
    GlobalHydra.instance().clear()


def run_cli(*args: str, cwd: Path, timeout: float = 300, env: dict | None = None):
    """Run `python -m segtrain ARGS` as a user would; returns the CompletedProcess."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env.pop("SEGTRAIN_DEBUG", None)
    full_env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(
        [sys.executable, "-m", "segtrain", *args],
        cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout,
    )


def score_loads_torch(args: list[str], cwd: Path) -> bool:
    """Run `segtrain score ARGS` in a fresh interpreter; whether it imported torch (it must
    not: start-up is part of score's speed, and torch alone costs 1.5-2.5 s)."""
    code = (f"import sys\nfrom segtrain.cli import main\nmain({['score', *args]!r})\n"
            "print('torch loaded' if 'torch' in sys.modules else 'no torch')")
    result = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    return not result.stdout.strip().endswith("no torch")


@pytest.fixture
def no_downloads(monkeypatch):
    """Any attempt to fetch weights over the network fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network download attempted: {args}")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty torch hub checkpoint cache under tmp_path; returns its `checkpoints` folder."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
    assert checkpoints == tmp_path / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    return checkpoints
