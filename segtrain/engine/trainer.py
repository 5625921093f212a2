"""A task-agnostic training loop: AMP, accumulation, clipping, EMA, evaluation, checkpoints, resume."""

from __future__ import annotations

import logging
import math
import shutil
import signal
import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader

from segtrain import __version__
from segtrain.engine.evaluation import autocast_context, evaluate_model
from segtrain.engine.monitor import Monitor
from segtrain.engine.stop_signals import StopSignals
from segtrain.errors import TrainingInterrupted
from segtrain.utils.checkpoint import capture_rng_state, restore_rng_state, save_checkpoint
from segtrain.utils.distributed import (
    all_reduce_sum,
    any_rank,
    barrier,
    broadcast_tensors,
    get_world_size,
    is_distributed,
    is_main_process,
)

log = logging.getLogger("segtrain.train")


@dataclass
class TrainerConfig:
    """The `trainer` config group (see conf/trainer/default.yaml for each key's meaning)."""

    max_iters: int | None = 600
    max_epochs: int | None = None
    eval_every: int = 200
    ckpt_every: int = 200
    precision: str = "fp32"
    device: str = "auto"
    grad_accum: int = 1
    clip_grad_norm: float | None = None
    channels_last: bool = False
    log_every: int = 20
    keep_last: int = 2
    best_metric: str | None = "auto"  # auto: the task's primary_metric
    best_mode: str = "max"
    deterministic: bool = False
    ema: float | None = None
    compile: bool = False
    skip_nonfinite: bool = False
    vis_images: int = 4
    sync_bn: bool = False
    find_unused_parameters: bool = False

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainerConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise KeyError(f"unknown trainer keys {unknown}; valid keys: {sorted(known)}")
        cfg = cls(**values)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"trainer.precision={self.precision!r}; expected fp32, bf16 or fp16")
        if self.max_iters is None and self.max_epochs is None:
            raise ValueError("set trainer.max_iters or trainer.max_epochs")
        if self.grad_accum < 1:
            raise ValueError(f"trainer.grad_accum={self.grad_accum}; expected an integer >= 1")
        if self.best_mode not in ("max", "min"):
            raise ValueError(f"trainer.best_mode={self.best_mode!r}; expected max or min")
        if self.ema is not None and not 0.0 < self.ema < 1.0:
            raise ValueError(f"trainer.ema={self.ema}; expected a decay in (0, 1) or null")
        for key in ("sync_bn", "find_unused_parameters"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"trainer.{key}={getattr(self, key)!r}; expected true or false")


@dataclass
class TrainState:
    """Where the run is; saved in every checkpoint so that resume continues exactly."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    best_value: float | None = None
    best_step: int | None = None
    skipped_steps: int = 0
    last_metrics: dict = field(default_factory=dict)
    world_size: int = 1  # ranks that trained: batch_in_epoch counts batches of one rank's share


def resolve_device(spec: str) -> torch.device:
    """'auto' picks CUDA when present; asking for CUDA without one is an error, not a fallback."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"trainer.device={spec} but no CUDA device is available; use auto or cpu")
    if device.type == "cuda" and device.index is None and is_distributed():
        # Under torchrun each rank has set its own GPU (cuda:LOCAL_RANK); DDP needs the index.
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def lookup_metric(metrics: dict, path: str) -> float:
    """Value at 'family/key' (e.g. 'semantic/mIoU') in a nested metrics dict."""
    node: Any = metrics
    for part in path.split("/"):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(
                f"trainer.best_metric={path!r} is not among the evaluation's metrics "
                f"(top level: {sorted(metrics)}); use e.g. semantic/mIoU"
            )
        node = node[part]
    return float(node)


class Trainer:
    """Loops over optimizer steps; the task supplies collate, losses, predictions and evaluator."""

    def __init__(
        self,
        model: nn.Module,
        task: Any,
        optimizer: torch.optim.Optimizer,
        scheduler_factory: Callable[[torch.optim.Optimizer, int], Any],
        train_loader: DataLoader,
        val_loader: DataLoader | None,
        cfg: TrainerConfig,
        run_dir: Path,
        checkpoint_extra: dict[str, Any] | None = None,
    ) -> None:
        if cfg.best_metric == "auto":
            cfg = replace(cfg, best_metric=getattr(task, "primary_metric", None))
        self.cfg, self.task, self.optimizer = cfg, task, optimizer
        self.train_loader, self.val_loader = train_loader, val_loader
        self.run_dir, self.ckpt_dir = Path(run_dir), Path(run_dir) / "checkpoints"
        self.checkpoint_extra = checkpoint_extra or {}
        self.device = resolve_device(cfg.device)
        memory_format = torch.channels_last if cfg.channels_last else torch.preserve_format
        self.model = model.to(self.device, memory_format=memory_format)
        if cfg.sync_bn and is_distributed():
            if self.device.type != "cuda":
                raise ValueError(
                    f"trainer.sync_bn=true needs CUDA (torch's SyncBatchNorm is GPU-only) but "
                    f"trainer.device resolves to {self.device}; set trainer.sync_bn=false"
                )
            # The converted layers keep the same Parameter objects: the optimizer stays valid.
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        # `self.model` stays unwrapped: checkpoints (keys without `module.`), EMA and evaluation
        # use it; only the training forward goes through DDP.
        self.ddp = self._wrap_ddp(self.model) if is_distributed() else None
        train_model = self.ddp if self.ddp is not None else self.model
        self.forward_model = torch.compile(train_model) if cfg.compile else train_model
        self.eval_model = self.forward_model
        if self.ddp is not None:
            self.eval_model = torch.compile(self.model) if cfg.compile else self.model
        self.ema = None
        if cfg.ema is not None:
            self.ema = AveragedModel(
                self.model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema), use_buffers=True
            )
        self.iters_per_epoch = len(train_loader) // cfg.grad_accum
        if self.iters_per_epoch == 0:
            raise ValueError(
                f"one epoch has {len(train_loader)} batches, fewer than trainer.grad_accum="
                f"{cfg.grad_accum}; lower grad_accum or data.batch_size"
            )
        self.total_iters = cfg.max_iters or cfg.max_epochs * self.iters_per_epoch
        self.scheduler = scheduler_factory(optimizer, self.total_iters)
        # fp16 needs loss scaling; with enabled=False the scaler passes everything through.
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.precision == "fp16")
        self.state = TrainState(world_size=get_world_size())
        self.stop_signals = StopSignals()

    def _wrap_ddp(self, model: nn.Module) -> DistributedDataParallel:
        """DistributedDataParallel over this rank's device (CUDA: one GPU per process)."""
        return DistributedDataParallel(
            model,
            device_ids=[self.device.index] if self.device.type == "cuda" else None,
            find_unused_parameters=self.cfg.find_unused_parameters,
        )

    # ----------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "trainer": vars(self.state).copy(),
            "rng": capture_rng_state(),
            "version": __version__,
            **self.checkpoint_extra,
        }

    def load_state_dict(self, ckpt: dict[str, Any]) -> None:
        """Restore everything `state_dict` saved, so that training continues the same run."""
        from segtrain.utils.checkpoint import load_model_state

        load_model_state(self.model, ckpt["model"], "the checkpoint to resume")
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        if self.ema is not None:
            if ckpt.get("ema") is None:
                raise ValueError("trainer.ema is set but the checkpoint holds no EMA weights")
            self.ema.load_state_dict(ckpt["ema"])
        self.state = TrainState(**ckpt["trainer"])
        if self.state.world_size != get_world_size():
            if self.state.batch_in_epoch:
                # Each rank's share of an epoch depends on the world size: the position inside
                # the interrupted epoch has no equivalent, so that epoch starts over.
                log.warning(
                    "the checkpoint was written by %d ranks, this run has %d: epoch %d restarts "
                    "from its first batch", self.state.world_size, get_world_size(), self.state.epoch,
                )
                self.state.batch_in_epoch = 0
            self.state.world_size = get_world_size()
        restore_rng_state(ckpt["rng"])

    def save(self, snapshot: bool = True, best: bool = False) -> Path:
        """Write checkpoints/last.pt; hard-link it as best.pt and as an iter_XXXXXXX.pt snapshot.

        Links share the bytes of one write; the next atomic replace of last.pt leaves them intact.
        """
        path = save_checkpoint(self.state_dict(), self.ckpt_dir / "last.pt")
        links = [self.ckpt_dir / "best.pt"] if best else []
        if snapshot and self.cfg.keep_last > 0:
            links.append(self.ckpt_dir / f"iter_{self.state.step:07d}.pt")
        for link in links:
            link.unlink(missing_ok=True)
            try:
                link.hardlink_to(path)
            except OSError:  # filesystems without hard links
                shutil.copyfile(path, link)
        if snapshot and self.cfg.keep_last > 0:
            for old in sorted(self.ckpt_dir.glob("iter_*.pt"))[: -self.cfg.keep_last]:
                old.unlink()
        return path

    # ----------------------------------------------------------------------------------- loop
    def _batches(self) -> Iterator[Any]:
        """Endless batches; the sampler restarts mid-epoch after a resume."""
        sampler = self.train_loader.sampler
        batch_size = self.train_loader.batch_size
        while True:
            sampler.set_epoch(self.state.epoch, start=self.state.batch_in_epoch * batch_size)
            for batch in self.train_loader:
                self.state.batch_in_epoch += 1
                yield batch
            self.state.epoch += 1
            self.state.batch_in_epoch = 0

    def train_step(self, batches: Iterator[Any]) -> dict[str, torch.Tensor] | None:
        """One optimizer step over `grad_accum` micro-batches; None when skipped as non-finite."""
        self.optimizer.zero_grad(set_to_none=True)
        totals: dict[str, torch.Tensor] = {}
        for micro_batch in range(self.cfg.grad_accum):
            batch = self.task.to_device(next(batches), self.device)
            with self._gradient_sync(micro_batch):
                with autocast_context(self.device, self.cfg.precision):
                    losses = self.task.training_step(self.forward_model, batch)
                loss = losses["loss"]
                # A CPU-GPU sync point, paid once per micro-batch to stop before weights turn NaN.
                if not self._finite_on_all_ranks(loss):
                    return self._non_finite(losses)
                self.scaler.scale(loss / self.cfg.grad_accum).backward()
            self.monitor.count_images(self.task.batch_size(batch))
            for name, value in losses.items():
                totals[name] = totals.get(name, 0.0) + value.detach() / self.cfg.grad_accum
        if self.cfg.clip_grad_norm:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        return totals

    def _gradient_sync(self, micro_batch: int) -> AbstractContextManager:
        """DDP all-reduces gradients in the backward of the last micro-batch only (`no_sync`)."""
        if self.ddp is None or micro_batch == self.cfg.grad_accum - 1:
            return nullcontext()
        return self.ddp.no_sync()

    def _finite_on_all_ranks(self, loss: torch.Tensor) -> bool:
        """Whether the loss is finite on every rank, so that all ranks skip or stop together
        (a rank leaving the step alone would leave the others waiting in the all-reduce)."""
        return not any_rank(int(not torch.isfinite(loss)), self.device)

    def _step_scheduler(self) -> None:
        if not self.scaler.is_enabled():
            self.scheduler.step()
            return
        # The scaler skips steps while it calibrates the loss scale; the schedule still follows
        # the iteration count on purpose, which is what torch warns about on the first step.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
            self.scheduler.step()

    def _non_finite(self, losses: dict[str, torch.Tensor]) -> None:
        parts = ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items())
        step = self.state.step + 1
        if not self.cfg.skip_nonfinite:
            raise FloatingPointError(
                f"non-finite loss at iteration {step} ({parts}); the last checkpoint is kept. "
                "Lower optimizer.lr, set trainer.clip_grad_norm, or pass "
                "trainer.skip_nonfinite=true to skip such steps"
            )
        self.optimizer.zero_grad(set_to_none=True)
        self.state.skipped_steps += 1
        log.warning("skipping iteration %d: non-finite loss (%s)", step, parts)
        return None

    def fit(self) -> dict:
        """Train to `total_iters`; returns the final evaluation's metrics."""
        self.monitor = Monitor(
            self.run_dir, self.total_iters, self.state.step, self.device, is_main_process()
        )
        self.stop_signals.install()
        window: dict[str, torch.Tensor] = {}
        window_steps = 0
        try:
            batches = self._batches()
            self.model.train()
            while self.state.step < self.total_iters:
                losses = self.train_step(batches)
                self.state.step += 1
                self._step_scheduler()
                self.monitor.step()
                if losses is not None:
                    window_steps += 1
                    for name, value in losses.items():
                        window[name] = window.get(name, 0.0) + value
                if self._due(self.cfg.log_every) and window_steps:
                    means = self._mean_over_ranks(window, window_steps)
                    self.monitor.log_train(self.state.step, means, self.optimizer.param_groups[-1]["lr"])
                    window, window_steps = {}, 0
                self._after_step()
            return self.state.last_metrics
        finally:
            self.stop_signals.restore()
            self.monitor.close()

    def _mean_over_ranks(self, window: dict[str, torch.Tensor], steps: int) -> dict[str, float]:
        """Each loss averaged over the logging window and, under DDP, over all ranks (one small
        all-reduce per log line), so the log shows the global batch's losses."""
        names = list(window)
        sums = torch.stack([torch.as_tensor(window[k], dtype=torch.float64) for k in names])
        if self.ddp is not None:
            all_reduce_sum(sums)
        sums /= steps * get_world_size()
        return dict(zip(names, sums.tolist()))

    def _due(self, every: int) -> bool:
        return self.state.step == self.total_iters or (every > 0 and self.state.step % every == 0)

    def _after_step(self) -> None:
        """The hooks, in order: evaluate, checkpoint (last/best), react to a stop signal."""
        self._agree_on_stop()
        new_best = False
        if self.val_loader is not None and self._due(self.cfg.eval_every):
            self.state.last_metrics = self.evaluate()
            new_best = self._is_new_best(self.state.last_metrics)
        periodic = self._due(self.cfg.ckpt_every)
        # Every rank takes the same decision (same step, same reduced metrics, agreed stop).
        if periodic or new_best or self.stop_signals.received is not None:
            if is_main_process():
                self.save(snapshot=periodic, best=new_best)
            # No rank goes on (or exits, which makes torchrun end rank 0) while rank 0 writes.
            barrier()
        if self.stop_signals.received is not None:
            self._stop()

    def _agree_on_stop(self) -> None:
        """Under DDP, a stop signal received by any rank stops every rank after this iteration:
        one all-reduce of an int per iteration. A rank that got no signal takes the largest
        signal number any rank got (its exit status follows from it)."""
        if self.ddp is None:
            return
        signum = any_rank(self.stop_signals.received or 0, self.device)
        if signum and self.stop_signals.received is None:
            self.stop_signals.received = signum

    def _is_new_best(self, metrics: dict) -> bool:
        if not self.cfg.best_metric:
            return False
        value = lookup_metric(metrics, self.cfg.best_metric)
        best = self.state.best_value
        better = best is None or (value > best if self.cfg.best_mode == "max" else value < best)
        if better and not math.isnan(value):
            self.state.best_value, self.state.best_step = value, self.state.step
            return True
        return False

    def evaluate(self) -> dict:
        """Evaluate the raw weights (and the EMA weights under 'ema' when kept).

        Files an evaluator writes (e.g. a results JSON) go to the run directory, the EMA
        evaluation's to its `ema/` subdirectory, so neither overwrites the other.

        Under DDP each rank evaluates its share of the validation set with the unwrapped model
        (DDP's forward would broadcast buffers: a collective the uneven shares cannot match);
        every rank gets the output directory, as per-image files (panoptic PNGs) are written
        by the rank that predicted them and whole-set files by rank 0 only.
        """
        self._share_rank0_buffers()
        progress = None if is_main_process() else False
        evaluator = self.task.build_evaluator(self.run_dir)
        metrics, kept = evaluate_model(
            self.eval_model, self.task, self.val_loader, evaluator, self.device,
            self.cfg.precision, keep_first=1 if self.cfg.vis_images else 0, progress=progress,
        )
        if self.ema is not None:
            ema_evaluator = self.task.build_evaluator(self.run_dir / "ema")
            ema_metrics, _ = evaluate_model(
                self.ema.module, self.task, self.val_loader, ema_evaluator, self.device,
                self.cfg.precision, progress=progress,
            )
            metrics["ema"] = ema_metrics
        images = None
        if kept and is_main_process():
            images = self.task.visualize(*kept[0], max_images=self.cfg.vis_images)
        self.monitor.log_metrics(self.state.step, metrics, images)
        return metrics

    def _share_rank0_buffers(self) -> None:
        """Copy rank 0's buffers (BatchNorm running stats) to every rank before evaluating.

        Each rank's last training forward updated its running stats from its own batch; rank 0's
        are the ones its checkpoint keeps, so all ranks evaluate that model (and its EMA).
        """
        if self.ddp is None:
            return
        buffers = list(self.model.buffers())
        if self.ema is not None:
            buffers += list(self.ema.buffers())
        broadcast_tensors(buffers)

    def _stop(self) -> None:
        """After last.pt is written: hand a preemption signal over (submitit requeues the job;
        a requeued run continues with resume=auto), then stop."""
        self.stop_signals.hand_over()
        name = signal.Signals(self.stop_signals.received).name
        raise TrainingInterrupted(
            f"{name}: stopped at iteration {self.state.step}/{self.total_iters}; checkpoint saved "
            f"to {self.ckpt_dir / 'last.pt'}.\nResume with: segtrain train resume=true "
            f"hydra.run.dir={self.run_dir} (plus the same overrides as this run)",
            exit_code=128 + self.stop_signals.received,
        )
