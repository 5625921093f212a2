"""A trained model rebuilt from its checkpoint alone: the stored run config (checked, with the
command line's values on top), the weights, the class metadata and the model family's adapter.
Composition code shared by `segtrain eval` and `segtrain predict`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn

from segtrain.builders import build_task
from segtrain.config_check import check_config
from segtrain.data.meta import DatasetMeta
from segtrain.eval_config import EVAL_KEYS, build_eval_config
from segtrain.utils.checkpoint import load_checkpoint, load_model_state


@dataclass
class LoadedModel:
    """What a checkpoint rebuilds: the model in eval mode on `device`, its adapter (`task`), the
    class metadata and the run config it was built from (the stored one, overrides applied)."""

    model: nn.Module
    task: Any
    meta: DatasetMeta
    run_cfg: DictConfig
    device: torch.device


def load_model_from_checkpoint(
    ckpt_path: str | Path,
    composed: DictConfig,
    overrides: Sequence[str],
    device: Callable[[DictConfig], torch.device],
    use_ema: bool = False,
    own_keys: frozenset[str] = EVAL_KEYS,
) -> LoadedModel:
    """Rebuild the model of `ckpt_path`.

    composed: the command's composed config (its `trust=` is read); overrides: the command line as
    Hydra received it, whose values edit the stored config (`build_eval_config`), except the
    command's own keys `own_keys`. device: picks the device from the run config (eval: the run's
    trainer.device; predict: its own `device=`). use_ema: load the EMA weights the run kept.
    Raises ValueError for a refused config, weights that do not fit, or missing EMA weights.
    """
    ckpt_path = Path(ckpt_path)
    ckpt = load_checkpoint(ckpt_path)
    source = f"checkpoint {ckpt_path}"
    run_cfg = build_eval_config(ckpt["config"], composed, overrides, source, own_keys=own_keys)
    check_config(run_cfg)  # after the trust check: this imports the (allowed) targets
    meta = DatasetMeta.from_dict(ckpt["meta"]) if "meta" in ckpt else _meta_from_data(run_cfg, ckpt_path)
    model = instantiate(run_cfg.model)
    state = ckpt["model"]
    if use_ema:
        if ckpt.get("ema") is None:
            raise ValueError(f"use_ema=true but {ckpt_path} holds no EMA weights (trainer.ema)")
        state = {k.removeprefix("module."): v for k, v in ckpt["ema"].items() if k != "n_averaged"}
    load_model_state(model, state, source)
    del ckpt  # the optimizer state and the rest are not needed past this point
    target = device(run_cfg)
    model.to(target).eval()
    return LoadedModel(model, build_task(run_cfg, meta, with_loss=False), meta, run_cfg, target)


def _meta_from_data(run_cfg: DictConfig, ckpt_path: Path) -> DatasetMeta:
    """Class metadata of a checkpoint written before checkpoints stored it: the val dataset's."""
    node = run_cfg.dataset.get("val") or run_cfg.dataset.get("train")
    try:
        return instantiate(node).meta
    except (OSError, ValueError) as err:
        raise ValueError(f"{ckpt_path} stores no class metadata (an older checkpoint), and its "
                         f"dataset, which would give it, cannot be read: {err}. Pass dataset.root=... "
                         "pointing at the data it was trained on") from err
