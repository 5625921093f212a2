"""BatchNorm running statistics at evaluation time: recompute them (PreciseBN) and check them.

In train mode a BatchNorm layer normalises with the batch's statistics; in eval mode with its
running statistics, an exponential average of past batches' statistics taken while the weights
were changing. With a small momentum (torchvision's MobileNetV3: 0.01, an average over the last
~100+ iterations) and weights that move fast (training from scratch) the running statistics lag
the weights they are used with, and the eval-mode model can predict something else than the
model the loss trained (docs/ARCHITECTURE.md, "BatchNorm statistics at evaluation").

`recompute_bn_stats` is detectron2's PreciseBN: run training batches through the model in train
mode, without gradients, with each layer's momentum set to a cumulative average, so the running
statistics become the average of those batches' statistics for the current weights.
`check_bn_stats` measures the symptom: how much better a validation batch scores with
BatchNorm normalising by the batch's own statistics than with the running ones.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader

from segtrain.data.loader import ResumableSampler, shutdown_workers
from segtrain.engine.evaluation import autocast_context
from segtrain.engine.trainer_config import lookup_metric
from segtrain.utils.distributed import all_reduce_sum, get_world_size, is_distributed
from segtrain.utils.tensors import to_cpu

log = logging.getLogger("segtrain.train")

# The evaluation warns when a validation batch scores more than this many points of the task's
# metric better with BatchNorm's batch statistics than with its running statistics. Measured
# (docs/BENCHMARKS.md, issue 13): -10..+6 for models that evaluate as they train (small batches
# flip uncertain objects either way), +20..+44 for LR-ASPP's eval-mode collapse.
MAX_METRIC_GAP = 15.0
# Added to the training sampler's seed: PreciseBN draws its own shuffled order, a function of
# (seed, iteration), never the training loader's.
_SAMPLER_SEED_OFFSET = 7_919


def batch_norm_layers(model: nn.Module) -> list[_BatchNorm]:
    """The BatchNorm layers (any dimension, SyncBatchNorm included) that keep running stats."""
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


@torch.no_grad()
def recompute_bn_stats(
    models: Sequence[nn.Module], batches: Iterable[Any], forward: Callable[[nn.Module, Any], Any]
) -> int:
    """Replace every BatchNorm layer's running mean and variance, in each of `models`, by the
    mean over `batches` of the batch statistics (the variance unbiased, as BatchNorm's own).

    Each batch goes through `forward(model, batch)` with the model in train mode and no
    gradients. Momentum, `num_batches_tracked` and train/eval modes are restored afterwards; if
    `batches` is empty the old statistics are kept. Returns the number of batches used.
    """
    layers = [batch_norm_layers(model) for model in models]
    saved = [[(m.momentum, m.running_mean.clone(), m.running_var.clone(),
               m.num_batches_tracked.clone()) for m in group] for group in layers]
    modes = [[(m, m.training) for m in model.modules()] for model in models]
    for group in layers:
        for layer in group:
            layer.reset_running_stats()
            layer.momentum = None  # cumulative average: 1/k of the k-th batch
    count = 0
    try:
        for model in models:
            model.train()
        for batch in batches:
            for model in models:
                forward(model, batch)
            count += 1
    finally:
        for group, group_saved in zip(layers, saved):
            for layer, (momentum, mean, var, tracked) in zip(group, group_saved):
                layer.momentum = momentum
                # The counter counts training batches; PreciseBN's are not.
                layer.num_batches_tracked.copy_(tracked)
                if count == 0:
                    layer.running_mean.copy_(mean)
                    layer.running_var.copy_(var)
        for model_modes in modes:
            for module, training in model_modes:
                module.training = training
    return count


def average_bn_stats_across_ranks(models: Sequence[nn.Module]) -> None:
    """Under DDP, set each running mean/variance to its mean over the ranks (one all-reduce).

    Every rank recomputed them from as many batches of its own share, so the mean over ranks is
    the mean over all those batches.
    """
    if not is_distributed():
        return
    stats = [t for model in models for m in batch_norm_layers(model)
             for t in (m.running_mean, m.running_var)]
    if not stats:
        return
    flat = torch.cat([t.detach().float().flatten() for t in stats])
    all_reduce_sum(flat)
    flat /= get_world_size()
    for tensor, part in zip(stats, flat.split([t.numel() for t in stats])):
        tensor.copy_(part.view_as(tensor))


def precise_bn_batches(train_loader: DataLoader, num_batches: int, step: int) -> Iterator[Any]:
    """Up to `num_batches` batches of the training set from a loader of their own.

    Its order is a shuffle seeded by (the training seed + an offset, `step`) and each sample's
    augmentation is seeded by (that shuffle's "epoch" = `step`, index), so PreciseBN at a given
    iteration sees the same batches in an uninterrupted and a resumed run, and the training
    loader's order and position are untouched. The loader's own generator keeps iterator
    creation off the global RNG.
    """
    train_sampler = train_loader.sampler
    sampler = ResumableSampler(len(train_loader.dataset), train_sampler.seed + _SAMPLER_SEED_OFFSET)
    sampler.set_epoch(step)
    loader = type(train_loader)(  # CorruptSkippingLoader too (data.skip_corrupt)
        train_loader.dataset,
        batch_size=train_loader.batch_size,
        sampler=sampler,
        collate_fn=train_loader.collate_fn,
        num_workers=train_loader.num_workers,
        pin_memory=train_loader.pin_memory,
        drop_last=True,
        worker_init_fn=train_loader.worker_init_fn,
        generator=torch.Generator().manual_seed(train_sampler.seed + _SAMPLER_SEED_OFFSET + step),
    )
    batches = iter(loader)
    try:
        for _, batch in zip(range(num_batches), batches):
            yield batch
    finally:  # also when the consumer fails or stops early: no worker outlives the loop
        shutdown_workers(loader, batches)


def precise_bn(
    models: Sequence[nn.Module],
    task: Any,
    train_loader: DataLoader,
    *,
    num_batches: int,
    step: int,
    device: torch.device,
    precision: str,
) -> None:
    """PreciseBN before an evaluation: recompute the running statistics of `models` from
    `num_batches` training batches per rank (through `task.training_step`, under the training
    precision), then average them over the ranks.

    The global RNG (CPU, and CUDA on a CUDA device) is forked, so the train-mode forwards
    (dropout, ...) leave the training run's random stream as it was.
    """
    if not any(batch_norm_layers(model) for model in models):
        return

    def forward(model: nn.Module, batch: Any) -> None:
        with autocast_context(device, precision):
            task.training_step(model, task.to_device(batch, device))

    batches = precise_bn_batches(train_loader, num_batches, step)
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            used = recompute_bn_stats(models, batches, forward)
    finally:
        batches.close()
    average_bn_stats_across_ranks(models)
    if used < num_batches:
        log.warning("trainer.precise_bn_batches=%d but the training set gives %d batches per "
                    "rank; BatchNorm statistics recomputed from %d", num_batches, used, used)


@contextmanager
def batch_statistics(model: nn.Module) -> Iterator[None]:
    """Inside, the model's BatchNorm layers normalise by the batch's statistics (train mode)
    while every other module keeps its mode; their buffers are restored on exit, so a forward
    inside updates nothing."""
    layers = batch_norm_layers(model)
    saved = [(m, m.training, [b.clone() for b in m.buffers()]) for m in layers]
    try:
        for layer in layers:
            layer.train()
        yield
    finally:
        for layer, training, buffers in saved:
            layer.train(training)
            for buffer, value in zip(layer.buffers(), buffers):
                buffer.copy_(value)


@dataclass(frozen=True)
class BNCheck:
    """One validation batch scored by the task's `metric` (0-100) twice: with BatchNorm's running
    statistics (`eval_value`, what the evaluation reports) and with the batch's own statistics
    (`batch_value`); `agreement` is the share of equal predictions, in [0, 1]."""

    metric: str
    eval_value: float
    batch_value: float
    agreement: float

    @property
    def stale(self) -> bool:
        """Whether the running statistics cost more than MAX_METRIC_GAP points."""
        return self.batch_value - self.eval_value > MAX_METRIC_GAP


@torch.no_grad()
def check_bn_stats(
    model: nn.Module, task: Any, batch: Any, predictions: Any, device: torch.device, precision: str
) -> BNCheck | None:
    """Score `predictions`, the eval-mode predictions of `batch`, and the model's predictions
    with its BatchNorm layers normalising by the batch's own statistics, each with a fresh
    evaluator of the task (`task.primary_metric`). Costs one forward of the batch.

    None (no check) when the model has no BatchNorm layer or the task no primary metric, when
    the predictions are not integer `sem_seg` label maps alone (instances would need a whole
    COCO evaluation), under DDP (an evaluator's `compute` is a
    collective), or when the batch is too small for batch statistics (a pooled 1x1 branch with
    one image).
    """
    metric = getattr(task, "primary_metric", None)
    if (metric is None or is_distributed() or not batch_norm_layers(model)
            or _label_maps(predictions) is None):
        return None
    was_training = model.training
    model.eval()
    try:
        with batch_statistics(model), autocast_context(device, precision):
            again = task.predict(model, task.to_device(batch, device))
    except ValueError as err:  # "Expected more than 1 value per channel when training"
        log.debug("BatchNorm statistics check skipped: %s", err)
        return None
    finally:
        model.train(was_training)
    before, after = _label_maps(predictions), _label_maps(again)
    if (after is None or len(after) != len(before)
            or any(a.shape != b.shape for a, b in zip(after, before)) or not sum(b.numel() for b in before)):
        return None
    values = []
    for scored in (predictions, again):
        evaluator = task.build_evaluator(None)
        evaluator.reset()
        evaluator.process(batch["targets"], to_cpu(scored))
        values.append(lookup_metric(evaluator.compute(), metric))
    if any(math.isnan(value) for value in values):
        return None
    same = sum(int((a.cpu() == b.cpu()).sum()) for a, b in zip(after, before))
    return BNCheck(metric, values[0], values[1], same / sum(b.numel() for b in before))


def _label_maps(predictions: Any) -> list[torch.Tensor] | None:
    """The `sem_seg` label maps of a batch's predictions, None unless that is all they hold."""
    if not isinstance(predictions, list) or not predictions:
        return None
    maps = []
    for prediction in predictions:
        if not isinstance(prediction, dict) or set(prediction) != {"sem_seg"}:
            return None
        sem_seg = prediction["sem_seg"]
        if not torch.is_tensor(sem_seg) or sem_seg.is_floating_point():
            return None
        maps.append(sem_seg)
    return maps


def warn_on_stale_bn_stats(check: BNCheck | None, step: int, precise_bn_on: bool) -> None:
    """Log a warning naming the fix when `check` found stale running statistics."""
    if check is None or not check.stale:
        return
    advice = ("raise trainer.precise_bn_batches" if precise_bn_on else
              "set trainer.precise_bn_batches=200 to recompute them before each evaluation")
    log.warning(
        "eval @ iter %d: the first validation batch scores %.1f %s in eval mode (BatchNorm's "
        "running statistics) but %.1f with the batch's own statistics (%.1f%% of predictions "
        "alike): the running statistics do not match the weights, and the metrics understate "
        "what the model learned; %s (trainer.bn_check=false turns this check off)",
        step, check.eval_value, check.metric, check.batch_value, 100 * check.agreement, advice,
    )
