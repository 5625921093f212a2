"""A task-agnostic training loop: AMP, accumulation, clipping, EMA, evaluation, checkpoints, resume."""

from __future__ import annotations

import logging
import math
import signal
import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader

from segtrain import __version__
from segtrain.data.loader import shutdown_workers
from segtrain.engine.batch_norm_stats import check_bn_stats, precise_bn, warn_on_stale_bn_stats
from segtrain.engine.evaluation import autocast_context, evaluate_model
from segtrain.engine.monitor import Monitor
from segtrain.engine.stop_signals import StopSignals
from segtrain.engine.trainer_config import TrainerConfig, TrainState, lookup_metric, resolve_device
from segtrain.errors import TrainingInterrupted
from segtrain.utils.checkpoint import (
    capture_rng_state,
    link_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from segtrain.utils.distributed import (
    all_reduce_sum,
    any_rank,
    barrier,
    broadcast_tensors,
    get_world_size,
    is_distributed,
    is_main_process,
)
from segtrain.utils.files import StorageError

log = logging.getLogger("segtrain.train")


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
        self.total_iters = cfg.max_iters or self._iters_in_epochs(cfg.max_epochs)
        self.scheduler = scheduler_factory(optimizer, self.total_iters)
        # fp16 needs loss scaling; with enabled=False the scaler passes everything through.
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.precision == "fp16")
        self.state = TrainState(world_size=get_world_size())
        self.stop_signals = StopSignals()
        self._saved_step: int | None = None  # iteration of the newest last.pt (None: none yet)
        self._epoch_iterator: Iterator[Any] | None = None  # the train loader's live iterator
        self._step_start: tuple[int, int] | None = None  # data position while a step runs
        self._optimizer_stepping = False
        self._consecutive_skips = 0

    def _iters_in_epochs(self, epochs: int) -> int:
        """Optimizer steps in the first `epochs` epochs. A sampler whose epochs differ in length
        (repeat-factor sampling) gives each epoch's `epoch_length`; otherwise every epoch has
        len(train_loader) batches."""
        epoch_length = getattr(self.train_loader.sampler, "epoch_length", None)
        if epoch_length is None:
            return epochs * self.iters_per_epoch
        batch_size = self.train_loader.batch_size
        return sum(epoch_length(e) // batch_size // self.cfg.grad_accum for e in range(epochs))

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
        self._saved_step = self.state.step

    def save(self, snapshot: bool = True, best: bool = False) -> Path:
        """Write checkpoints/last.pt; hard-link it as best.pt and as an iter_XXXXXXX.pt snapshot.

        Links share the bytes of one write; the next atomic replace of last.pt leaves them intact.
        """
        path = save_checkpoint(self.state_dict(), self.ckpt_dir / "last.pt")
        self._saved_step = self.state.step
        links = [self.ckpt_dir / "best.pt"] if best else []
        if snapshot and self.cfg.keep_last > 0:
            links.append(self.ckpt_dir / f"iter_{self.state.step:07d}.pt")
        for link in links:
            link_checkpoint(path, link)
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
            self._epoch_iterator = iter(self.train_loader)
            for batch in self._epoch_iterator:
                self.state.batch_in_epoch += 1
                yield batch
            self.state.epoch += 1
            self.state.batch_in_epoch = 0

    def train_step(self, batches: Iterator[Any]) -> dict[str, torch.Tensor] | None:
        """One optimizer step over `grad_accum` micro-batches; None when skipped as non-finite."""
        self.optimizer.zero_grad(set_to_none=True)
        self._step_start = (self.state.epoch, self.state.batch_in_epoch)
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
            norm = nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip_grad_norm)
            # Clipping by a NaN/inf norm would turn every weight into NaN. fp16's scaler skips
            # such steps itself; elsewhere they are non-finite steps (a CPU-GPU sync point, paid
            # only with clipping). Gradients are all-reduced by now: every rank decides alike.
            if not self.scaler.is_enabled() and not torch.isfinite(norm):
                return self._non_finite({**totals, "grad_norm": norm}, "gradient")
        # From here until the step ends, a failure leaves the weights half-updated: not saved.
        self._optimizer_stepping = True
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        self._optimizer_stepping = False
        self._consecutive_skips = 0
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

    def _non_finite(self, losses: dict[str, torch.Tensor], what: str = "loss") -> None:
        """Stop on a non-finite loss or gradient norm, or skip the step (`skip_nonfinite`) until
        `skip_nonfinite_limit` steps in a row were skipped. Nothing is saved: the weights that
        produced the loss may already be diverging, and the newest last.pt must stay usable."""
        parts = ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items())
        step = self.state.step + 1
        if self.cfg.skip_nonfinite and self._consecutive_skips < self.cfg.skip_nonfinite_limit:
            self.optimizer.zero_grad(set_to_none=True)
            self.state.skipped_steps += 1
            self._consecutive_skips += 1
            log.warning("skipping iteration %d: non-finite %s (%s); %d skipped so far", step, what,
                        parts, self.state.skipped_steps)
            return None
        if self.cfg.skip_nonfinite:
            cause = (f"{self._consecutive_skips + 1} iterations in a row had a non-finite loss or gradient "
                     f"(trainer.skip_nonfinite_limit={self.cfg.skip_nonfinite_limit}; "
                     f"{self.state.skipped_steps} skipped in all), the last at iteration {step} ({parts})")
            advice = "Lower optimizer.lr or set trainer.clip_grad_norm"
        else:
            cause = f"non-finite {what} at iteration {step} ({parts})"
            advice = ("Lower optimizer.lr, set trainer.clip_grad_norm, or pass "
                      "trainer.skip_nonfinite=true to skip such steps")
        raise FloatingPointError(f"{cause}; {self._checkpoint_status()}. {advice}")

    def _checkpoint_status(self) -> str:
        """Which checkpoint a stopped run leaves, in words, for error messages."""
        last = self.ckpt_dir / "last.pt"
        if self._saved_step is not None and last.is_file():
            return f"{last} (iteration {self._saved_step}) is kept"
        due = f" (trainer.ckpt_every={self.cfg.ckpt_every})" if self.cfg.ckpt_every else ""
        return f"no checkpoint was written yet{due}"

    def fit(self) -> dict:
        """Train to `total_iters`; returns the final evaluation's metrics.

        Whatever way the loop ends, the loader workers and the TensorBoard writer end with it;
        a failure that leaves consistent weights (bad data, a failed evaluation) first saves
        last.pt (see `_save_before_failing`).
        """
        self.monitor = Monitor(
            self.run_dir, self.total_iters, self.state.step, self.device, is_main_process()
        )
        self.stop_signals.install()
        window: dict[str, torch.Tensor] = {}
        window_steps = 0
        batches = self._batches()
        try:
            self.model.train()
            while self.state.step < self.total_iters:
                losses = self.train_step(batches)
                self.state.step += 1
                self._step_start = None
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
            if self.state.skipped_steps:
                log.warning("%d of %d iterations were skipped for a non-finite loss "
                            "(trainer.skip_nonfinite=true)", self.state.skipped_steps, self.total_iters)
            return self.state.last_metrics
        except Exception as err:
            self._save_before_failing(err)
            raise
        finally:
            batches.close()
            shutdown_workers(self.train_loader, self._epoch_iterator)
            self._epoch_iterator = None
            self.stop_signals.restore()
            try:
                self.monitor.close()
            except OSError as close_err:  # e.g. a full disk: the error that ended the run matters more
                log.error("could not flush the TensorBoard log: %s", close_err)

    def _save_before_failing(self, err: Exception) -> None:
        """Write last.pt before an error ends the run, when the weights are those of a finished
        step and newer than the last checkpoint: a bad sample, a failed evaluation or a model
        error then costs no training. Not after a non-finite loss (the weights may be diverging),
        a refused write (the disk would refuse this one too) nor mid optimizer step. The data
        position is rewound to the failed step's first batch."""
        unsafe = isinstance(err, (FloatingPointError, TrainingInterrupted, StorageError))
        if (unsafe or self._optimizer_stepping or not is_main_process() or self.state.step == 0
                or self._saved_step == self.state.step):
            return
        if self._step_start is not None:
            self.state.epoch, self.state.batch_in_epoch = self._step_start
        try:
            path = self.save(snapshot=False)
        except Exception as save_err:  # noqa: BLE001 - the original error is the one to report
            log.error("could not save a checkpoint before stopping: %s", save_err)
            return
        log.warning(
            "stopping on an error at iteration %d; saved %s first. After fixing the cause, resume "
            "with: segtrain train resume=true hydra.run.dir=%s (plus the same overrides)",
            self.state.step, path, self.run_dir,
        )

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

        With `precise_bn_batches`, BatchNorm statistics (the raw model's and the EMA's) are first
        recomputed from that many training batches of a loader of their own; the checkpoint
        written after this evaluation keeps them. `bn_check` scores the first validation batch
        with BatchNorm's running and with its batch statistics, and warns when they differ much.
        """
        if self.cfg.precise_bn_batches:
            precise_bn(
                [self.model] + ([self.ema.module] if self.ema is not None else []), self.task,
                self.train_loader, num_batches=self.cfg.precise_bn_batches, step=self.state.step,
                device=self.device, precision=self.cfg.precision,
            )
        self._share_rank0_buffers()
        progress = None if is_main_process() else False
        evaluator = self.task.build_evaluator(self.run_dir)
        metrics, kept = evaluate_model(
            self.eval_model, self.task, self.val_loader, evaluator, self.device, self.cfg.precision,
            keep_first=1 if self.cfg.vis_images or self.cfg.bn_check else 0, progress=progress,
        )
        if self.cfg.bn_check and kept:
            check = check_bn_stats(self.model, self.task, *kept[0], self.device, self.cfg.precision)
            warn_on_stale_bn_stats(check, self.state.step, bool(self.cfg.precise_bn_batches))
        if self.ema is not None:
            ema_evaluator = self.task.build_evaluator(self.run_dir / "ema")
            ema_metrics, _ = evaluate_model(
                self.ema.module, self.task, self.val_loader, ema_evaluator, self.device,
                self.cfg.precision, progress=progress,
            )
            metrics["ema"] = ema_metrics
        images = None
        if kept and is_main_process() and self.cfg.vis_images:
            images = self.task.visualize(*kept[0], max_images=self.cfg.vis_images)
        figures = evaluator.figures() if is_main_process() and hasattr(evaluator, "figures") else {}
        self.monitor.log_metrics(self.state.step, metrics, images, figures)
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
