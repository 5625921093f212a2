"""Every option of every config group composes into a train config that resolves and builds."""

from __future__ import annotations

import pytest
from conftest import ROOT
from hydra.utils import instantiate
from omegaconf import OmegaConf

from segtrain.builders import build_task
from segtrain.engine.trainer import TrainerConfig

GROUP_OPTIONS = sorted(
    (path.parent.name, path.stem) for path in (ROOT / "conf").glob("*/*.yaml")
)


def _groups(config: str) -> set[str]:
    """Groups that `conf/<config>.yaml`'s own defaults list selects."""
    entries = OmegaConf.load(ROOT / "conf" / f"{config}.yaml").defaults
    named = (str(next(iter(entry))) for entry in entries if not isinstance(entry, str))
    return {name.removeprefix("optional ").split("@")[0] for name in named}


# Groups chosen by eval.yaml (and predict.yaml) rather than train.yaml, e.g. tta.
EVAL_ONLY_GROUPS = _groups("eval") - _groups("train")


@pytest.mark.parametrize(("group", "option"), GROUP_OPTIONS, ids=[f"{g}={o}" for g, o in GROUP_OPTIONS])
def test_group_option_composes_and_resolves(compose_cfg, group, option):
    cfg = compose_cfg("eval" if group in EVAL_ONLY_GROUPS else "train", [f"{group}={option}"])
    resolved = OmegaConf.to_container(cfg, resolve=True)
    option_cfg = OmegaConf.load(ROOT / "conf" / group / f"{option}.yaml")
    option_cfg.pop("defaults", None)
    if group in ("experiment", "tuned"):  # global presets: every key they set reaches the config
        for key, value in _leaves(OmegaConf.to_container(option_cfg)):
            assert OmegaConf.select(cfg, key) == value, key
        return
    assert resolved[group] is not None
    assert option_cfg.keys() <= cfg[group].keys()


def _leaves(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def test_contract_keys_exist_in_the_train_config(compose_cfg):
    cfg = compose_cfg("train")
    for key in ("seed", "resume", "trainer.max_iters", "trainer.max_epochs", "trainer.eval_every",
                "trainer.ckpt_every", "trainer.precision", "trainer.device", "trainer.grad_accum",
                "trainer.clip_grad_norm", "data.batch_size", "data.num_workers", "dataset.root",
                "optimizer.lr", "optimizer.weight_decay"):
        assert OmegaConf.select(cfg, key, default="<missing>") != "<missing>", key


def test_trainer_group_matches_the_trainer_dataclass(compose_cfg):
    cfg = compose_cfg("train")
    TrainerConfig.from_dict(OmegaConf.to_container(cfg.trainer, resolve=True))


def test_default_train_config_builds_dataset_model_and_task(compose_cfg):
    cfg = compose_cfg("train", ["dataset.train.num_samples=4"])
    dataset = instantiate(cfg.dataset.train)
    model = instantiate(cfg.model)
    task = build_task(cfg, dataset.meta)
    batch = task.collate([dataset[0], dataset[1]])
    losses = task.training_step(model, batch)
    assert losses["loss"].ndim == 0 and losses["loss"].item() > 0
    predictions = task.predict(model, batch)
    assert [p["sem_seg"].shape for p in predictions] == [t["semantic"].shape for t in batch["targets"]]


def test_eval_config_inherits_the_train_groups(compose_cfg):
    cfg = compose_cfg("eval", ["ckpt=x.pt"])
    assert cfg.ckpt == "x.pt" and "model" in cfg and cfg.use_ema is False
