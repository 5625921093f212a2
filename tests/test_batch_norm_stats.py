"""BatchNorm statistics at evaluation: PreciseBN, the stale-statistics check, the LR-ASPP fix."""

from __future__ import annotations

import copy
import logging
import os
import signal
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_trainer import ToyTask
from torch import nn
from torch.utils.data import Dataset

from segtrain.data.loader import build_eval_loader, build_train_loader
from segtrain.engine.batch_norm_stats import (
    MAX_METRIC_GAP,
    BNCheck,
    batch_norm_layers,
    check_bn_stats,
    precise_bn,
    precise_bn_batches,
    recompute_bn_stats,
    warn_on_stale_bn_stats,
)
from segtrain.engine.trainer import Trainer, TrainerConfig, TrainingInterrupted
from segtrain.utils.checkpoint import load_checkpoint


def conv_bn_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4, momentum=0.01), nn.ReLU(),
        nn.Conv2d(4, 5, 1), nn.BatchNorm2d(5, momentum=0.01),
    )


def test_recompute_gives_the_mean_of_the_batch_statistics_and_restores_the_layers():
    model = conv_bn_net().eval()
    bns = [model[1], model[4]]
    tracked = [bn.num_batches_tracked.clone() for bn in bns]
    batches = [torch.randn(2, 3, 5, 6) * 3 + 1 for _ in range(4)]

    # By hand: each layer's inputs in train mode (batch statistics) on a copy.
    reference = copy.deepcopy(model).train()
    inputs: dict[int, list[torch.Tensor]] = {0: [], 1: []}
    for i, bn in enumerate([reference[1], reference[4]]):
        bn.register_forward_pre_hook(lambda m, args, i=i: inputs[i].append(args[0].detach()))
    with torch.no_grad():
        for x in batches:
            reference(x)

    used = recompute_bn_stats([model], batches, lambda m, x: m(x))

    assert used == 4
    for i, bn in enumerate(bns):
        means = torch.stack([x.mean(dim=(0, 2, 3)) for x in inputs[i]])
        variances = torch.stack([x.var(dim=(0, 2, 3), unbiased=True) for x in inputs[i]])
        torch.testing.assert_close(bn.running_mean, means.mean(0), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bn.running_var, variances.mean(0), rtol=1e-5, atol=1e-6)
        assert bn.momentum == 0.01
        assert torch.equal(bn.num_batches_tracked, tracked[i])
    assert not any(m.training for m in model.modules())  # eval mode restored
    assert all(p.grad is None for p in model.parameters())


def test_recompute_without_batches_keeps_the_old_statistics():
    model = conv_bn_net()
    before = copy.deepcopy(model.state_dict())
    assert recompute_bn_stats([model], [], lambda m, x: m(x)) == 0
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


class Threshold(Dataset):
    """x ~ N(3, 2) in R^1, label 1 where x > 3: a BatchNorm that centres x at its true mean
    followed by logits (-z, z) classifies perfectly."""

    def __init__(self, n: int = 32) -> None:
        self.x = torch.randn(n, 1, generator=torch.Generator().manual_seed(0)) * 2 + 3

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], int(self.x[i, 0] > 3)


class _Accuracy:
    def reset(self) -> None:
        self.correct = self.total = 0

    def process(self, targets, predictions) -> None:
        predictions = torch.stack([p["sem_seg"] for p in predictions])
        self.correct += int((predictions == targets).sum())
        self.total += len(predictions)

    def compute(self) -> dict:
        return {"toy": {"acc": 100.0 * self.correct / self.total}}


class ThresholdTask(ToyTask):
    """Integer class predictions scored by accuracy, as a semantic task's class maps by mIoU."""

    primary_metric = "toy/acc"

    def collate(self, samples):
        y = torch.tensor([s[1] for s in samples])
        return {"x": torch.stack([s[0] for s in samples]), "y": y, "targets": y}

    def training_step(self, model, batch):
        return {"loss": nn.functional.cross_entropy(model(batch["x"]), batch["y"])}

    def predict(self, model, batch):
        return [{"sem_seg": label} for label in model(batch["x"]).argmax(1)]

    def build_evaluator(self, output_dir=None):
        return _Accuracy()


def threshold_net(stale: bool) -> nn.Sequential:
    """BatchNorm1d -> fixed logits (-z, z). `stale`: a running mean of 10 that never moves
    (momentum 0), so in eval mode every input is below it and one class is predicted."""
    bn = nn.BatchNorm1d(1, momentum=0.0 if stale else 0.1)
    if stale:
        bn.running_mean.fill_(10.0)
    logits = nn.Linear(1, 2, bias=False)
    logits.weight.data = torch.tensor([[-1.0], [1.0]])
    return nn.Sequential(bn, logits)


def first_batch(task, n=16):
    data = Threshold(n)
    return task.collate([data[i] for i in range(n)])


def test_check_scores_eval_and_batch_statistics_and_flags_stale_ones():
    task, device = ThresholdTask(), torch.device("cpu")
    batch = first_batch(task)

    healthy = threshold_net(stale=False)
    recompute_bn_stats([healthy], [batch], lambda m, b: task.training_step(m, b))
    healthy.eval()
    check = check_bn_stats(healthy, task, batch, task.predict(healthy, batch), device, "fp32")
    assert check.metric == "toy/acc" and check.batch_value == 100.0
    assert check.eval_value == 100.0 and check.agreement == 1.0 and not check.stale

    stale = threshold_net(stale=True).eval()
    state = copy.deepcopy(stale.state_dict())
    check = check_bn_stats(stale, task, batch, task.predict(stale, batch), device, "fp32")
    assert check.batch_value == 100.0 and check.eval_value < 100.0 - MAX_METRIC_GAP
    assert check.stale
    # The batch-statistics forward changed no buffer and left the model in eval mode.
    for key, value in stale.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert not any(m.training for m in stale.modules())


def test_check_does_not_apply_without_batch_norm_or_to_non_class_predictions():
    task, device = ThresholdTask(), torch.device("cpu")
    batch = first_batch(task)
    model = threshold_net(stale=True).eval()
    no_bn = nn.Sequential(nn.Identity(), model[1])
    assert check_bn_stats(no_bn, task, batch, task.predict(no_bn, batch), device, "fp32") is None
    scores = model(batch["x"])  # float scores, e.g. a regression or detection scores
    assert check_bn_stats(model, task, batch, scores, device, "fp32") is None
    assert check_bn_stats(model, task, batch, [{"labels": torch.zeros(1)}], device, "fp32") is None


def test_stale_statistics_warning_names_the_fix(caplog):
    stale = BNCheck("semantic/mIoU", eval_value=13.1, batch_value=57.5, agreement=0.81)
    noisy = BNCheck("semantic/mIoU", eval_value=90.5, batch_value=82.4, agreement=0.97)
    with caplog.at_level(logging.WARNING, logger="segtrain.train"):
        warn_on_stale_bn_stats(stale, step=300, precise_bn_on=False)
        warn_on_stale_bn_stats(noisy, step=300, precise_bn_on=False)
        warn_on_stale_bn_stats(None, step=300, precise_bn_on=False)
    assert len(caplog.records) == 1
    assert "13.1 semantic/mIoU in eval mode" in caplog.text and "but 57.5" in caplog.text
    assert "81.0% of predictions alike" in caplog.text
    assert "trainer.precise_bn_batches=200" in caplog.text


# ------------------------------------------------------------------------------ in the Trainer
class Points(Dataset):
    """x in R^4, y = sum(x); the noise stands in for random augmentation (global torch RNG)."""

    def __init__(self, n: int = 32) -> None:
        self.x = torch.randn(n, 4, generator=torch.Generator().manual_seed(0)) * 3 + 2

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        x = self.x[i] + 0.1 * torch.randn(4)
        return x, x.sum(dim=0, keepdim=True)


class PointsTask(ToyTask):
    """test_trainer's regression task; records the losses of training steps only (PreciseBN
    runs `training_step` too, without gradients)."""

    def training_step(self, model, batch):
        loss = nn.functional.mse_loss(model(batch["x"]), batch["y"])
        if torch.is_grad_enabled():
            self.losses.append(loss.item())
            if self.on_step:
                self.on_step(len(self.losses))
        return {"loss": loss}


def points_trainer(tmp_path, task=None, seed_model=0, **overrides) -> Trainer:
    torch.manual_seed(seed_model)
    # Dropout draws from the global RNG in train mode: PreciseBN's forwards must not shift it.
    model = nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16, momentum=0.01), nn.Dropout(0.2),
                          nn.ReLU(), nn.Linear(16, 1))
    task = task or PointsTask()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    settings = dict(max_iters=8, eval_every=4, ckpt_every=4, device="cpu", log_every=2,
                    best_metric="toy/mse", best_mode="min", keep_last=1, vis_images=0)
    settings.update(overrides)
    data = Points()
    train_loader = build_train_loader(data, 4, task.collate, seed=7)
    val_loader = build_eval_loader(data, 8, task.collate)

    def schedule(opt, total):
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / total)

    return Trainer(model, task, optimizer, schedule, train_loader, val_loader,
                   TrainerConfig.from_dict(settings), tmp_path,
                   checkpoint_extra={"config": "{}", "meta": {}})


def test_precise_bn_changes_the_statistics_but_not_the_training_run(tmp_path):
    plain = points_trainer(tmp_path / "plain")
    plain.fit()
    precise = points_trainer(tmp_path / "precise", precise_bn_batches=3)
    rng = torch.get_rng_state()
    precise.fit()

    # Same data order, same dropout draws, same weights: PreciseBN consumed neither.
    assert precise.task.losses == plain.task.losses
    for p, q in zip(plain.model.parameters(), precise.model.parameters()):
        assert torch.equal(p, q)
    assert not torch.equal(torch.get_rng_state(), rng)  # (training itself did draw)
    bn, plain_bn = precise.model[1], plain.model[1]
    assert not torch.allclose(bn.running_mean, plain_bn.running_mean)
    assert bn.momentum == 0.01 and torch.equal(bn.num_batches_tracked, plain_bn.num_batches_tracked)
    # The checkpoint written after the last evaluation holds the recomputed statistics.
    ckpt = load_checkpoint(tmp_path / "precise" / "checkpoints" / "last.pt")
    assert torch.equal(ckpt["model"]["1.running_mean"], bn.running_mean)


def test_precise_bn_leaves_the_global_rng_as_it_was(tmp_path):
    trainer = points_trainer(tmp_path, precise_bn_batches=3)
    trainer.fit()
    trainer.monitor.log_metrics = lambda *args, **kwargs: None  # fit() closed the monitor
    states = []
    for batches in (3, 0):  # the evaluation itself (its loader's iterator) draws; compare
        trainer.cfg = replace(trainer.cfg, precise_bn_batches=batches)
        torch.manual_seed(5)
        trainer.evaluate()
        states.append(torch.get_rng_state())
    assert torch.equal(states[0], states[1])


def test_resumed_run_with_precise_bn_repeats_the_uninterrupted_one(tmp_path):
    reference = points_trainer(tmp_path / "ref", precise_bn_batches=3)
    reference.fit()

    task = PointsTask()
    task.on_step = lambda n: os.kill(os.getpid(), signal.SIGTERM) if n == 5 else None
    interrupted = points_trainer(tmp_path / "run", task=task, precise_bn_batches=3)
    with pytest.raises(TrainingInterrupted):
        interrupted.fit()
    resumed = points_trainer(tmp_path / "run", seed_model=123, precise_bn_batches=3)
    torch.manual_seed(999)
    resumed.load_state_dict(load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt"))
    resumed.fit()

    assert task.losses[:5] + resumed.task.losses == reference.task.losses
    for key, value in reference.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key


def test_precise_bn_batches_must_be_a_count():
    with pytest.raises(ValueError, match="precise_bn_batches"):
        TrainerConfig.from_dict({"precise_bn_batches": -1})
    with pytest.raises(ValueError, match="bn_check"):
        TrainerConfig.from_dict({"bn_check": "yes"})


@pytest.mark.parametrize("precise_bn_batches", [0, 4])
def test_trainer_warns_when_batch_statistics_score_much_better(tmp_path, caplog, precise_bn_batches):
    task = ThresholdTask()
    data = Threshold(32)
    model = threshold_net(stale=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    cfg = TrainerConfig.from_dict(dict(max_iters=2, eval_every=2, ckpt_every=0, device="cpu",
                                       vis_images=0, precise_bn_batches=precise_bn_batches))
    trainer = Trainer(
        model, task, optimizer,
        lambda opt, total: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
        build_train_loader(data, 8, task.collate, seed=0), build_eval_loader(data, 16, task.collate),
        cfg, tmp_path, checkpoint_extra={"config": "{}", "meta": {}},
    )
    with caplog.at_level(logging.WARNING, logger="segtrain.train"):
        trainer.fit()
    warned = "with the batch's own statistics" in caplog.text
    # Stale running statistics warn; PreciseBN recomputes them, and the warning goes.
    assert warned == (precise_bn_batches == 0)


def _precise_bn_worker(rank: int, world: int, tmp: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    try:
        task = PointsTask()
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6, momentum=0.01))
        loader = build_train_loader(Points(32), 4, task.collate, seed=7)  # this rank's share
        # By hand: this rank's batches (the same function precise_bn draws them from).
        inputs = [model[0](b["x"]).detach() for b in precise_bn_batches(loader, 3, step=5)]
        local_mean = torch.stack([x.mean(0) for x in inputs]).mean(0)
        local_var = torch.stack([x.var(0, unbiased=True) for x in inputs]).mean(0)
        precise_bn([model], task, loader, num_batches=3, step=5, device=torch.device("cpu"),
                   precision="fp32")
        torch.save({"mean": model[1].running_mean, "var": model[1].running_var,
                    "local_mean": local_mean, "local_var": local_var,
                    "first_x": inputs[0][0]}, Path(tmp) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(300)
def test_precise_bn_under_ddp_averages_every_ranks_batches(tmp_path):
    mp.spawn(_precise_bn_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert not torch.equal(ranks[0]["first_x"], ranks[1]["first_x"])  # each rank its own share
    for r in ranks:
        torch.testing.assert_close(r["mean"], (ranks[0]["local_mean"] + ranks[1]["local_mean"]) / 2)
        torch.testing.assert_close(r["var"], (ranks[0]["local_var"] + ranks[1]["local_var"]) / 2)


# ------------------------------------------------------------------ the root cause in LR-ASPP
def test_from_scratch_mobilenet_models_get_batch_norm_momentum_0_1(tmp_path):
    from torchvision.models import mobilenet_v3_large

    from segtrain.models.torchvision_seg import build_torchvision_segmentation

    scratch = build_torchvision_segmentation("lraspp_mobilenet_v3_large", num_classes=3)
    assert {m.momentum for m in batch_norm_layers(scratch)} == {0.1}

    # With pretrained statistics torchvision's 0.01 stays (they only need fine-tuning).
    backbone = tmp_path / "mobilenet_v3_large.pth"
    torch.save(mobilenet_v3_large(weights=None).state_dict(), backbone)
    pretrained = build_torchvision_segmentation("lraspp_mobilenet_v3_large", num_classes=3,
                                                weights_backbone=str(backbone))
    assert 0.01 in {m.momentum for m in batch_norm_layers(pretrained.backbone)}
