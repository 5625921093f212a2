"""Plain `segtrain train` is a recipe that learns: the tuned keys of conf/tuned/ and where they apply."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli
from hydra.utils import instantiate
from omegaconf import OmegaConf

from segtrain.train import build_optimizer

# What docs/BENCHMARKS.md measured ("Default composition"): >= 80 mIoU after 300 iterations.
MEASURED_RECIPE = {
    "dataset.name": "synthetic",
    "dataset.num_classes": 6,
    "dataset.train.image_size": 128,
    "dataset.train.num_samples": 4096,
    "model._target_": "segtrain.models.unet.build_unet",
    "model.base_channels": 16,
    "model.depth": 4,
    "model.norm": "bn",
    "model.aux_head": True,
    "task.aux_weight": 0.4,
    "loss._target_": "segtrain.losses.CrossEntropyLoss",
    "optimizer._target_": "torch.optim.AdamW",
    "optimizer.lr": 0.003,
    "optimizer.weight_decay": 0.01,
    "scheduler._target_": "segtrain.optim.schedulers.poly",
    "scheduler.power": 0.9,
    "scheduler.warmup_iters": 0,
    "data.batch_size": 8,
    "trainer.precision": "fp32",
    "trainer.grad_accum": 1,
    "seed": 0,
}


def test_default_composition_is_the_measured_recipe(compose_cfg):
    cfg = compose_cfg("train")
    assert {key: OmegaConf.select(cfg, key) for key in MEASURED_RECIPE} == MEASURED_RECIPE


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        # Another optimizer keeps its own lr and the generic U-Net.
        (["optimizer=sgd"], {"optimizer.lr": 0.01, "model.base_channels": 8,
                             "model.aux_head": False}),
        # `~tuned` removes the tuned keys: the generic defaults.
        (["~tuned"], {"optimizer.lr": 0.001, "model.base_channels": 8, "model.aux_head": False}),
        # The demo preset still trains what docs/BENCHMARKS.md measured for `make demo`.
        (["experiment=synthetic_unet"], {"optimizer.lr": 0.003, "model.base_channels": 8,
                                         "model.aux_head": False, "scheduler.warmup_iters": 50,
                                         "trainer.max_iters": 1300}),
        # The command line wins over the tuned keys.
        (["optimizer.lr=0.0005", "model.base_channels=4"], {"optimizer.lr": 0.0005,
                                                            "model.base_channels": 4}),
    ],
)
def test_tuned_keys_apply_only_to_their_combination(compose_cfg, overrides, expected):
    cfg = compose_cfg("train", overrides)
    assert {key: OmegaConf.select(cfg, key) for key in expected} == expected


def test_tuned_keys_leave_other_models_alone(compose_cfg):
    cfg = compose_cfg("train", ["model=fcn_resnet50"])
    assert cfg.optimizer.lr == 0.001 and "base_channels" not in cfg.model


def test_default_recipe_builds_for_runs_of_a_few_iterations(compose_cfg):
    """No warmup longer than a short run: `segtrain train trainer.max_iters=2` must work."""
    cfg = compose_cfg("train")
    optimizer = build_optimizer(cfg.optimizer, instantiate(cfg.model))
    instantiate(cfg.scheduler)(optimizer, 2)


@pytest.mark.slow
def test_default_recipe_learns_the_shapes_in_100_iterations(tmp_path):
    """A third of the measured run: the tuned default passes 50 mIoU where the generic
    defaults (width 8, no aux head, lr 1e-3) reached 24 (docs/BENCHMARKS.md)."""
    result = run_cli(
        "train", "trainer.max_iters=100", "trainer.eval_every=0", "trainer.ckpt_every=0",
        "trainer.vis_images=0", "dataset.val.num_samples=64", "data.num_workers=0",
        "trainer.device=cpu", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["semantic"]["mIoU"] >= 50, metrics["semantic"]
