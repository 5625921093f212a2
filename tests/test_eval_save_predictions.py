"""`segtrain eval save_predictions=true` writes what `predict` writes, for the validation split,
and the files score to the numbers the evaluation reported."""

from __future__ import annotations

import json
import shutil

import numpy as np
import torch
from conftest import ROOT, run_cli
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from segtrain.metrics.semantic import SemanticEvaluator

CKPT = ROOT / "tests" / "fixtures" / "old_checkpoints" / "unet_synthetic_147c88d.pt"


def test_eval_save_predictions_writes_label_pngs_that_score_as_the_evaluation(tmp_path):
    ckpt = tmp_path / CKPT.name
    shutil.copy(CKPT, ckpt)
    out = tmp_path / "eval"
    run = run_cli("eval", f"ckpt={ckpt}", "data.num_workers=2", "save_predictions=true",
                  f"output={out}", cwd=tmp_path, timeout=180)
    assert run.returncode == 0, run.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    pngs = sorted((out / "predictions" / "semantic").glob("*.png"))
    overlays = sorted((out / "predictions" / "overlays").glob("*.jpg"))
    assert len(pngs) == len(overlays) == 4
    # the validation set the checkpoint's config describes, scored against the written files
    stored = OmegaConf.create(torch.load(ckpt, weights_only=True)["config"])
    from segtrain.config_upgrade import upgrade_targets

    val = instantiate(OmegaConf.create(upgrade_targets(OmegaConf.to_container(stored, resolve=True)))
                      .dataset.val)
    evaluator = SemanticEvaluator(val.meta.num_classes, val.meta.ignore_index, val.meta.classes)
    for index in range(len(val)):
        _, target = val[index]
        png = out / "predictions" / "semantic" / f"{int(target['image_id']):012d}.png"
        written = np.asarray(Image.open(png))
        evaluator.update(torch.from_numpy(written.astype(np.int64)), target["semantic"])
    assert evaluator.compute()["semantic"]["mIoU"] == metrics["semantic"]["mIoU"]
    # a second run into the same folder refuses rather than overwrite the files
    again = run_cli("eval", f"ckpt={ckpt}", "data.num_workers=0", "save_predictions=true",
                    f"output={out}", cwd=tmp_path, timeout=180)
    assert again.returncode == 1 and "overwrite" in again.stderr
