"""Parameter groups, learning-rate schedules and the optimizer/scheduler configs."""

from __future__ import annotations

import io
import math
import pickle
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from segtrain.optim import build_param_groups, cosine, multistep, poly

CONF = Path(__file__).resolve().parents[1] / "conf"


class TinySegmenter(nn.Module):
    """Backbone conv+BN; head conv, GroupNorm, LayerNorm; one frozen and one shared weight."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3, bias=True), nn.BatchNorm2d(4))
        self.head = nn.Sequential(nn.Conv2d(4, 4, 1), nn.GroupNorm(2, 4), nn.Conv2d(4, 2, 1))
        self.norm = nn.LayerNorm(2)
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)
        self.tied = nn.Linear(2, 2, bias=False)
        self.tied_again = nn.Linear(2, 2, bias=False)
        self.tied_again.weight = self.tied.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.head(self.backbone(x)).mean(dim=(2, 3)))


def groups_by_name(groups: list[dict]) -> dict[str, dict]:
    return {g["name"]: g for g in groups}


def ids(params) -> set[int]:
    return {id(p) for p in params}


# ------------------------------------------------------------------------------ param groups
def test_param_groups_split_backbone_lr_and_norm_bias_decay():
    model = TinySegmenter()
    groups = groups_by_name(
        build_param_groups(model, lr=0.1, weight_decay=1e-4, backbone_lr_mult=0.1)
    )
    assert set(groups) == {"backbone.decay", "backbone.norm", "backbone.bias",
                           "head.decay", "head.norm", "head.bias"}
    conv, bn = model.backbone[0], model.backbone[1]
    assert ids(groups["backbone.decay"]["params"]) == {id(conv.weight)}
    assert ids(groups["backbone.bias"]["params"]) == {id(conv.bias)}
    assert ids(groups["backbone.norm"]["params"]) == {id(bn.weight), id(bn.bias)}
    assert ids(groups["head.norm"]["params"]) == ids(
        [*model.head[1].parameters(), *model.norm.parameters()]
    )
    assert ids(groups["head.decay"]["params"]) == {
        id(model.head[0].weight), id(model.head[2].weight), id(model.tied.weight)
    }
    for name, group in groups.items():
        assert group["lr"] == pytest.approx(0.01 if name.startswith("backbone") else 0.1)
        assert group["weight_decay"] == (1e-4 if name.endswith("decay") else 0.0)


def test_param_groups_hold_every_trainable_parameter_exactly_once():
    model = TinySegmenter()
    groups = build_param_groups(model, lr=0.1, weight_decay=1e-4)
    listed = [id(p) for g in groups for p in g["params"]]
    trainable = [id(p) for p in model.parameters() if p.requires_grad]  # dedups the tied weight
    assert len(listed) == len(set(listed)) and set(listed) == set(trainable)
    assert id(model.frozen.weight) not in listed


def test_bias_weight_decay_defaults_to_norm_weight_decay_and_can_differ():
    model = TinySegmenter()
    groups = groups_by_name(build_param_groups(model, 0.1, 1e-4, norm_weight_decay=1e-5))
    assert groups["head.bias"]["weight_decay"] == 1e-5 == groups["head.norm"]["weight_decay"]
    groups = groups_by_name(
        build_param_groups(model, 0.1, 1e-4, norm_weight_decay=0.0, bias_weight_decay=1e-4)
    )
    assert groups["head.bias"]["weight_decay"] == 1e-4 and groups["head.norm"]["weight_decay"] == 0


def test_param_groups_drop_empty_groups_when_there_is_no_backbone():
    model = nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), nn.BatchNorm2d(4))
    groups = build_param_groups(model, lr=0.1, weight_decay=1e-4)
    assert [g["name"] for g in groups] == ["head.decay", "head.norm"]


def test_param_groups_reject_negative_values():
    with pytest.raises(ValueError, match="backbone_lr_mult=-1"):
        build_param_groups(TinySegmenter(), lr=0.1, weight_decay=0.0, backbone_lr_mult=-1)


# -------------------------------------------------------------------------------- schedulers
def lrs_at(factory, steps: list[int], base_lrs=(0.1,), **kwargs) -> list[list[float]]:
    """The groups' learning rates after each of `steps` scheduler steps."""
    params = [nn.Parameter(torch.zeros(1)) for _ in base_lrs]
    optimizer = torch.optim.SGD([{"params": [p], "lr": lr} for p, lr in zip(params, base_lrs)])
    scheduler = factory(optimizer, **kwargs)
    seen, out = 0, []
    for step in steps:
        for _ in range(step - seen):
            optimizer.step()
            scheduler.step()
        seen = step
        out.append([g["lr"] for g in optimizer.param_groups])
    return out


def test_poly_with_warmup_gives_exact_lrs():
    got = lrs_at(poly, [0, 5, 10, 50, 100], total_iters=100, power=0.9, warmup_iters=10,
                 warmup_factor=0.001)
    at_10 = 0.9**0.9
    expected = [0.001, 0.001 + (at_10 - 0.001) * 0.5, at_10, 0.5**0.9, 0.0]
    assert [lr[0] for lr in got] == pytest.approx([0.1 * e for e in expected], rel=1e-12)


def test_poly_decays_to_min_lr_ratio_and_scales_every_group():
    got = lrs_at(poly, [0, 50, 100], base_lrs=(0.1, 0.01), total_iters=100, power=1.0,
                 min_lr_ratio=0.1)
    assert got == [pytest.approx([0.1, 0.01]), pytest.approx([0.055, 0.0055]),
                   pytest.approx([0.01, 0.001])]


def test_cosine_gives_exact_lrs():
    got = lrs_at(cosine, [0, 25, 50, 100], total_iters=100, min_lr_ratio=0.2)
    expected = [1.0, 0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi / 4)), 0.6, 0.2]
    assert [lr[0] for lr in got] == pytest.approx([0.1 * e for e in expected], rel=1e-12)


def test_cosine_warmup_ramps_linearly_from_warmup_factor():
    got = lrs_at(cosine, [0, 2, 4], total_iters=8, warmup_iters=4, warmup_factor=0.1)
    at_4 = 0.5 * (1 + math.cos(math.pi / 2))
    expected = [0.1, 0.1 + (at_4 - 0.1) * 0.5, at_4]
    assert [lr[0] for lr in got] == pytest.approx([0.1 * e for e in expected], rel=1e-12)


def test_multistep_accepts_fraction_and_iteration_milestones():
    got = lrs_at(multistep, [0, 49, 50, 79, 80, 100], total_iters=100, milestones=[0.5, 80],
                 gamma=0.1)
    expected = [0.1, 0.1, 0.01, 0.01, 0.001, 0.001]
    assert [lr[0] for lr in got] == pytest.approx(expected, rel=1e-12)


def test_multistep_warmup_ramps_to_the_schedule_value():
    got = lrs_at(multistep, [0, 5, 10, 30], total_iters=40, milestones=[20], warmup_iters=10,
                 warmup_factor=0.001)
    expected = [0.001, 0.001 + 0.999 * 0.5, 1.0, 0.1]
    assert [lr[0] for lr in got] == pytest.approx([0.1 * e for e in expected], rel=1e-12)


@pytest.mark.parametrize(
    ("factory", "kwargs"),
    [(poly, {"warmup_iters": 5}), (cosine, {"min_lr_ratio": 0.1}),
     (multistep, {"milestones": [10, 25]})],
)
def test_scheduler_state_restore_continues_the_schedule_exactly(factory, kwargs):
    def build():
        model = nn.Linear(2, 1)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        return optimizer, factory(optimizer, total_iters=40, **kwargs)

    def run(optimizer, scheduler, steps):
        out = []
        for _ in range(steps):
            optimizer.step()
            scheduler.step()
            out.append(optimizer.param_groups[0]["lr"])
        return out

    optimizer, scheduler = build()
    run(optimizer, scheduler, 17)
    buffer = io.BytesIO()
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    uninterrupted = run(optimizer, scheduler, 23)

    resumed_opt, resumed_sched = build()
    resumed_opt.load_state_dict(state["optimizer"])
    resumed_sched.load_state_dict(state["scheduler"])
    assert resumed_sched.last_epoch == 17
    assert run(resumed_opt, resumed_sched, 23) == uninterrupted
    assert uninterrupted[0] != uninterrupted[-1]


def test_schedule_factor_pickles():
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    factor = pickle.loads(pickle.dumps(poly(optimizer, total_iters=10).lr_lambdas[0]))
    assert factor(5) == pytest.approx(0.5**0.9)


@pytest.mark.parametrize(
    ("factory", "kwargs", "message"),
    [
        (poly, {"total_iters": 0}, "total_iters=0"),
        (cosine, {"total_iters": 10, "warmup_iters": 10}, "warmup_iters=10"),
        (poly, {"total_iters": 10, "warmup_factor": 1.5}, "warmup_factor=1.5"),
        (poly, {"total_iters": 10, "min_lr_ratio": -0.1}, "min_lr_ratio=-0.1"),
        (multistep, {"total_iters": 10, "milestones": [6, 4]}, "strictly increasing"),
        (multistep, {"total_iters": 10, "milestones": [0.8, 5]}, "strictly increasing"),
        (multistep, {"total_iters": 10, "milestones": [1.5]}, "must lie in \\(0, 1\\)"),
        (multistep, {"total_iters": 10, "milestones": [11]}, "milestone 11"),
        (multistep, {"total_iters": 10, "milestones": [5], "gamma": 0}, "gamma=0"),
    ],
)
def test_scheduler_rejects_bad_arguments(factory, kwargs, message):
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match=message):
        factory(optimizer, **kwargs)


# ------------------------------------------------------------------------------------ configs
def compose(group: str, path: Path):
    return OmegaConf.create(
        {"dataset": {"ignore_index": 255, "num_classes": 4}, group: OmegaConf.load(path)}
    )


@pytest.mark.parametrize("path", sorted((CONF / "optimizer").glob("*.yaml")), ids=lambda p: p.stem)
def test_optimizer_config_builds_groups_steps_and_checkpoints(path):
    opt_cfg = compose("optimizer", path).optimizer
    extras = {key: opt_cfg.pop(key) for key in ("backbone_lr_mult", "norm_weight_decay", "bias_weight_decay")}
    model = TinySegmenter()
    groups = build_param_groups(model, lr=opt_cfg.lr, weight_decay=opt_cfg.weight_decay, **extras)
    optimizer = instantiate(opt_cfg)(groups)
    by_name = groups_by_name(optimizer.param_groups)
    assert by_name["head.decay"]["weight_decay"] == opt_cfg.weight_decay > 0
    assert by_name["head.norm"]["weight_decay"] == extras["norm_weight_decay"]
    assert by_name["backbone.decay"]["lr"] == pytest.approx(opt_cfg.lr * extras["backbone_lr_mult"])

    before = model.backbone[0].weight.detach().clone()
    model(torch.randn(2, 3, 8, 8)).square().sum().backward()
    optimizer.step()
    assert not torch.equal(before, model.backbone[0].weight)
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=True)["param_groups"][0]["name"] == "backbone.decay"


@pytest.mark.parametrize("path", sorted((CONF / "scheduler").glob("*.yaml")), ids=lambda p: p.stem)
def test_scheduler_config_starts_at_base_lr_and_decays_by_the_end(path):
    factory = instantiate(compose("scheduler", path).scheduler)
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = factory(optimizer, total_iters=6)
    lrs = [optimizer.param_groups[0]["lr"]]
    for _ in range(6):
        optimizer.step()
        scheduler.step()
        lrs.append(optimizer.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(0.1)
    assert all(b <= a for a, b in zip(lrs, lrs[1:])) and lrs[-1] < 0.05
