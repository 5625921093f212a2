"""Backbone x head is a free combination: every pair below builds from the composed config, trains
(finite losses, a gradient on every trainable parameter), predicts the format of
segtrain.predictions at an odd image size, and its checkpoint evaluates to the run's metrics.

The table covers each head and each backbone family at least once, at tiny sizes.
"""

from __future__ import annotations

import inspect
import json
import math

import pytest
import torch
from conftest import ROOT, run_cli
from hydra.utils import get_object, instantiate
from omegaconf import OmegaConf

from segtrain.builders import build_task
from segtrain.optim.param_groups import build_param_groups
from segtrain.predictions import check_prediction

SEMANTIC = ["dataset=synthetic", "dataset.train.image_size=64", "dataset.val.image_size=64"]
DETECTOR = ["model.min_size=64", "model.max_size=64", "model.rpn_pre_nms_top_n_test=50",
            "model.rpn_post_nms_top_n_test=20", "model.box_score_thresh=0.0"]
INSTANCE = ["dataset=synthetic_instance", "dataset.train.image_size=64", "dataset.val.image_size=64",
            *DETECTOR]
PANOPTIC = ["dataset=synthetic_panoptic", *DETECTOR, "task.instance_score_thresh=0.0",
            "task.stuff_area_thresh=1"]

# (model config, backbone) -> the overrides that make it tiny.
PAIRS = {
    ("deeplabv3plus", "resnet50"): SEMANTIC,  # dilated, output stride 8 (the recipe's)
    ("pspnet", "mobilenet_v3_large"): [*SEMANTIC, "model.output_stride=32"],
    ("upernet", "swin_t"): SEMANTIC,
    ("upernet", "convnext_tiny"): [*SEMANTIC, "model.aux_head=false"],
    ("segformer", "mit_b0"): SEMANTIC,
    ("segformer", "timm:resnet18"): SEMANTIC,
    ("fcn", "regnet_y_400mf"): [*SEMANTIC, "model.output_stride=32"],
    ("unet", "efficientnet_b0"): SEMANTIC,
    ("unet", "resnet18"): SEMANTIC,
    ("maskrcnn_small", "swin_v2_t"): INSTANCE,
    ("maskrcnn_small", "convnext_tiny"): INSTANCE,
    ("panoptic_fpn_small", "timm:resnet18"): PANOPTIC,
}
IDS = [f"{model}+{backbone}" for model, backbone in PAIRS]
ODD = (97, 131)


def _overrides(model: str, backbone: str) -> list[str]:
    return [f"model={model}", f"model.backbone={backbone}", *PAIRS[model, backbone],
            "dataset.train.num_samples=4", "dataset.val.num_samples=2"]


@pytest.mark.parametrize(("model_name", "backbone"), list(PAIRS), ids=IDS)
def test_pair_trains_and_predicts_the_contract_at_an_odd_size(compose_cfg, model_name, backbone):
    cfg = compose_cfg("train", _overrides(model_name, backbone))
    train_set = instantiate(cfg.dataset.train)
    task = build_task(cfg, train_set.meta)
    torch.manual_seed(0)
    model = instantiate(cfg.model).train()
    assert model.backbone is not None
    losses = task.training_step(model, task.collate([train_set[0], train_set[1]]))
    assert all(math.isfinite(float(v.detach())) for v in losses.values()), losses
    losses["loss"].backward()
    groups = build_param_groups(model, lr=0.01, weight_decay=1e-4)
    assert {g["name"].split(".")[0] for g in groups} == {"backbone", "head"}
    for group in groups:
        for param in group["params"]:
            assert param.grad is not None and torch.isfinite(param.grad).all(), group["name"]
        assert any(bool(p.grad.abs().sum() > 0) for p in group["params"]), group["name"]

    image, target = train_set[0]
    odd = (torch.randint(0, 256, (3, *ODD), dtype=torch.uint8), {
        "image_id": target["image_id"], "orig_size": torch.tensor(ODD)})
    with torch.no_grad():
        predictions = task.predict(model.eval(), task.collate([odd]))
    check_prediction(predictions[0], ODD)


@pytest.mark.slow
@pytest.mark.parametrize(("model_name", "backbone"), list(PAIRS), ids=IDS)
def test_pair_checkpoint_evaluates_to_the_runs_metrics(tmp_path, model_name, backbone):
    run = tmp_path / "run"
    trained = run_cli("train", *_overrides(model_name, backbone), "data.batch_size=2", "data.num_workers=0",
                      "trainer.max_iters=2", "trainer.eval_every=2", "trainer.ckpt_every=2",
                      "trainer.device=cpu", "trainer.vis_images=0", f"hydra.run.dir={run}", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr[-3000:]
    evaluated = run_cli("eval", f"ckpt={run / 'checkpoints' / 'last.pt'}", f"output={tmp_path / 'eval.json'}",
                        cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert json.loads((tmp_path / "eval.json").read_text()) == json.loads((run / "metrics.json").read_text())


EXPERIMENTS = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_recipe_sets_only_options_its_model_takes(compose_cfg, experiment):
    cfg = compose_cfg("train", [f"experiment={experiment}"])
    model = OmegaConf.to_container(cfg.model)
    parameters = inspect.signature(get_object(model.pop("_target_"))).parameters
    keywords = set(parameters)
    if any(p.kind == p.VAR_KEYWORD for p in parameters.values()):  # panoptic_fpn: build_maskrcnn's
        from segtrain.models.maskrcnn import build_maskrcnn

        keywords |= set(inspect.signature(build_maskrcnn).parameters)
    assert set(model) <= keywords, set(model) - keywords
