"""The Trainer on a toy task: accumulation, non-finite losses, checkpoints, EMA and exact resume."""

from __future__ import annotations

import os
import signal

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from segtrain.data.loader import build_eval_loader, build_train_loader
from segtrain.engine.evaluation import evaluate_model
from segtrain.engine.trainer import Trainer, TrainerConfig, TrainingInterrupted
from segtrain.utils.checkpoint import load_checkpoint


class NoisyPoints(Dataset):
    """x in R^4, y = sum(x); the noise stands in for random augmentation (global torch RNG)."""

    def __init__(self, n: int = 32) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 4, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        x = self.x[i] + 0.1 * torch.randn(4)
        return x, x.sum(dim=0, keepdim=True)


class MSEEvaluator:
    def reset(self) -> None:
        self.total, self.count = 0.0, 0

    def process(self, targets, predictions) -> None:
        self.total += float(((predictions - targets) ** 2).sum())
        self.count += len(predictions)

    def compute(self) -> dict:
        return {"toy": {"mse": self.total / self.count}}


class ToyTask:

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.output_dirs: list = []
        self.on_step = None

    def collate(self, samples):
        y = torch.stack([s[1] for s in samples])
        return {"x": torch.stack([s[0] for s in samples]), "y": y, "targets": y}

    def to_device(self, batch, device):
        return {k: v.to(device) for k, v in batch.items()}

    def batch_size(self, batch) -> int:
        return len(batch["x"])

    def training_step(self, model, batch):
        loss = nn.functional.mse_loss(model(batch["x"]), batch["y"])
        self.losses.append(loss.item())
        if self.on_step:
            self.on_step(len(self.losses))
        return {"loss": loss}

    def predict(self, model, batch):
        return model(batch["x"])

    def build_evaluator(self, output_dir=None):
        self.output_dirs.append(output_dir)
        return MSEEvaluator()

    def visualize(self, batch, predictions, max_images=4):
        return None


def make_trainer(tmp_path, task=None, seed_model=0, batch_size=4, **overrides) -> Trainer:
    torch.manual_seed(seed_model)
    model = nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.2), nn.ReLU(), nn.Linear(16, 1))
    task = task or ToyTask()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    settings = dict(max_iters=8, eval_every=4, ckpt_every=4, device="cpu", log_every=2,
                    best_metric="toy/mse", best_mode="min", keep_last=1, vis_images=0)
    settings.update(overrides)
    cfg = TrainerConfig.from_dict(settings)
    data = NoisyPoints()
    train_loader = build_train_loader(data, batch_size, task.collate, seed=7)
    val_loader = build_eval_loader(data, 8, task.collate)

    def schedule(opt, total):
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / total)

    return Trainer(model, task, optimizer, schedule, train_loader, val_loader, cfg, tmp_path,
                   checkpoint_extra={"config": "{}", "meta": {}})


def test_training_reduces_the_loss_and_writes_checkpoints(tmp_path):
    trainer = make_trainer(tmp_path, max_iters=40, eval_every=20, ckpt_every=20)
    before, _ = evaluate_model(trainer.model, trainer.task, trainer.val_loader, MSEEvaluator(),
                               trainer.device)
    metrics = trainer.fit()
    assert metrics["toy"]["mse"] < 0.5 * before["toy"]["mse"]
    ckpts = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["best.pt", "iter_0000040.pt", "last.pt"]
    last = load_checkpoint(ckpts / "last.pt")
    assert last["trainer"]["step"] == 40
    assert last["trainer"]["last_metrics"] == metrics
    assert load_checkpoint(ckpts / "best.pt")["trainer"]["best_value"] == pytest.approx(
        min(metrics["toy"]["mse"], last["trainer"]["best_value"]))


def test_auto_best_metric_is_the_task_primary_metric(tmp_path):
    task = ToyTask()
    task.primary_metric = "toy/mse"
    trainer = make_trainer(tmp_path / "a", task=task, best_metric="auto")
    assert trainer.cfg.best_metric == "toy/mse"
    trainer.fit()
    assert (tmp_path / "a" / "checkpoints" / "best.pt").exists()
    plain = make_trainer(tmp_path / "b", best_metric="auto")  # a task that names none: no best.pt
    assert plain.cfg.best_metric is None
    plain.fit()
    assert not (tmp_path / "b" / "checkpoints" / "best.pt").exists()


def test_keep_last_prunes_older_snapshots(tmp_path):
    make_trainer(tmp_path, max_iters=8, ckpt_every=2, eval_every=0, keep_last=2).fit()
    names = sorted(p.name for p in (tmp_path / "checkpoints").glob("iter_*.pt"))
    assert names == ["iter_0000006.pt", "iter_0000008.pt"]


def test_epoch_based_run_counts_optimizer_steps_per_epoch(tmp_path):
    # 32 samples / batch 4 = 8 micro-batches per epoch = 4 optimizer steps with grad_accum=2.
    trainer = make_trainer(tmp_path, max_iters=None, max_epochs=3, grad_accum=2, eval_every=0)
    assert trainer.total_iters == 12
    trainer.fit()
    assert len(trainer.task.losses) == 24
    assert (trainer.state.epoch, trainer.state.batch_in_epoch) == (2, 8)  # ends on the last batch


def test_gradient_accumulation_matches_a_larger_batch(tmp_path):
    big = make_trainer(tmp_path / "a", batch_size=8, max_iters=1, eval_every=0)
    small = make_trainer(tmp_path / "b", batch_size=4, grad_accum=2, max_iters=1, eval_every=0)
    for trainer in (big, small):
        trainer.model[1].p = 0.0  # dropout off: the comparison is about gradients only
        trainer.fit()
    for p, q in zip(big.model.parameters(), small.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert big.state.step == small.state.step == 1


def test_non_finite_loss_stops_with_the_iteration_number(tmp_path):
    task = ToyTask()
    trainer = make_trainer(tmp_path, task=task, eval_every=0, ckpt_every=2)
    original = task.training_step

    def poisoned(model, batch):
        out = original(model, batch)
        return {"loss": out["loss"] * float("nan")} if len(task.losses) == 3 else out

    task.training_step = poisoned
    with pytest.raises(FloatingPointError, match="iteration 3"):
        trainer.fit()
    # The checkpoint of iteration 2 is still there and loadable: nothing lost.
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["trainer"]["step"] == 2


def test_skip_nonfinite_skips_the_step_and_counts_it(tmp_path):
    task = ToyTask()
    trainer = make_trainer(tmp_path, task=task, eval_every=0, skip_nonfinite=True, max_iters=4)
    original = task.training_step
    task.training_step = lambda m, b: (
        {"loss": original(m, b)["loss"] * float("inf")} if len(task.losses) == 2 else original(m, b))
    trainer.fit()
    assert trainer.state.skipped_steps == 1
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_gradient_clipping_bounds_the_update(tmp_path):
    trainer = make_trainer(tmp_path, max_iters=1, eval_every=0, clip_grad_norm=1e-3)
    trainer.optimizer.param_groups[0]["momentum"] = 0.0
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.fit()
    step = torch.cat([(p.detach() - b).flatten() for p, b in zip(trainer.model.parameters(), before)])
    # lr 0.02 * clipped norm 1e-3: the whole update is at most 2e-5 long.
    assert step.norm() <= 0.02 * 1e-3 * 1.001


def test_ema_is_evaluated_and_checkpointed(tmp_path):
    trainer = make_trainer(tmp_path, ema=0.9)
    metrics = trainer.fit()
    assert set(metrics) == {"toy", "ema"} and "mse" in metrics["ema"]["toy"]
    # The EMA evaluation's files (results JSONs) must not overwrite the raw model's.
    assert trainer.task.output_dirs[-2:] == [trainer.run_dir, trainer.run_dir / "ema"]
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert ckpt["ema"] is not None and int(ckpt["ema"]["n_averaged"]) == 8
    assert not torch.equal(ckpt["ema"]["module.0.weight"], ckpt["model"]["0.weight"])


@pytest.mark.filterwarnings("error::UserWarning")  # no scheduler-order warning from the scaler
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_on_cpu(tmp_path, precision):
    trainer = make_trainer(tmp_path, precision=precision, eval_every=0)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.fit()
    assert all(torch.isfinite(torch.tensor(trainer.task.losses)))
    assert trainer.scaler.is_enabled() == (precision == "fp16")
    assert any(not torch.equal(b, p) for b, p in zip(before, trainer.model.parameters()))


def test_interrupted_and_resumed_run_repeats_the_uninterrupted_losses(tmp_path):
    reference = make_trainer(tmp_path / "ref")
    reference.fit()

    task = ToyTask()
    task.on_step = lambda n: os.kill(os.getpid(), signal.SIGTERM) if n == 3 else None
    interrupted = make_trainer(tmp_path / "run", task=task)
    with pytest.raises(TrainingInterrupted, match="iteration 3/8") as stop:
        interrupted.fit()
    assert stop.value.exit_code == 128 + signal.SIGTERM
    assert "resume=true" in str(stop.value)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored

    resumed = make_trainer(tmp_path / "run", seed_model=123)  # other init: the checkpoint must win
    torch.manual_seed(999)  # and other global RNG state
    resumed.load_state_dict(load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt"))
    resumed.fit()
    assert task.losses[:3] + resumed.task.losses == reference.task.losses
    for p, q in zip(reference.model.parameters(), resumed.model.parameters()):
        assert torch.equal(p, q)


def test_unknown_trainer_key_is_rejected_with_valid_keys():
    with pytest.raises(KeyError, match="max_iter.*valid keys"):
        TrainerConfig.from_dict({"max_iter": 3})


@pytest.mark.slow
def test_compiled_model_trains_like_the_eager_one(tmp_path):
    runs = []
    for compile_model in (False, True):
        trainer = make_trainer(tmp_path / str(compile_model), compile=compile_model, max_iters=3,
                               eval_every=0)
        trainer.model[1].p = 0.0  # inductor's dropout draws other random numbers than eager's
        trainer.fit()
        runs.append(trainer)
    assert runs[1].forward_model is not runs[1].model  # the compiled wrapper did the work
    torch.testing.assert_close(runs[1].task.losses, runs[0].task.losses, rtol=1e-4, atol=1e-5)
    # The checkpoint holds the plain module's keys, not the compiled wrapper's.
    assert all(not k.startswith("_orig_mod") for k in runs[1].state_dict()["model"])
