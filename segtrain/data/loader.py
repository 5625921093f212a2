"""Data loaders whose order and augmentations are a pure function of (seed, epoch, sample index).

That makes a resumed run see exactly the batches the uninterrupted run would have seen, whatever
the number of workers, and lets a run restart mid-epoch without loading the skipped samples.
With `skip_corrupt`, a sample that does not decode is replaced by the next one, (i + 1) % len,
so the order stays a function of (seed, epoch) and the skips are reported, never silent.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from segtrain.data.codecs.image_io import CorruptImageError
from segtrain.data.samplers import RepeatFactorSampler
from segtrain.utils.distributed import get_rank, get_world_size

log = logging.getLogger("segtrain.data")
_SHOWN_SKIPS = 3  # error messages (each naming its file) quoted in an epoch's summary
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def init_worker(worker_id: int) -> None:
    """Loader workers leave SIGINT/SIGTERM to the main process, and die with it.

    Ctrl-C and cluster schedulers signal the whole process group; a worker killed by the signal
    would make the main process raise mid-step instead of writing its checkpoint and stopping.
    Ignoring SIGTERM means `terminate()` cannot end a worker: `shutdown_workers` ends them
    through the loader, and on Linux the kernel kills a worker whose parent dies (even by
    SIGKILL), so no worker outlives its run.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _die_with_parent()


def _die_with_parent() -> None:
    """prctl(PR_SET_PDEATHSIG, SIGKILL) where the platform has it; a no-op elsewhere."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # no prctl: the loader's own watchdog still ends workers
        return
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(1)


def shutdown_workers(loader: DataLoader, iterator: Iterator[Any] | None = None) -> None:
    """End the worker processes of `iterator` and of `loader`'s persistent iterator, if any.

    A failed step leaves the iterator referenced from the traceback, and multiprocessing's exit
    handler would then wait forever on workers that ignore SIGTERM: call this on every way out
    of a loop over a loader that did not run to its end. Safe to call twice.
    """
    for live in (iterator, getattr(loader, "_iterator", None)):
        if live is not None and hasattr(live, "_shutdown_workers"):
            live._shutdown_workers()
    if getattr(loader, "_iterator", None) is not None:
        loader._iterator = None


class ResumableSampler(Sampler):
    """Shuffled (epoch, index) pairs, sharded across ranks, able to start mid-epoch.

    The permutation of epoch e comes from a generator seeded with (seed, e). Each rank takes a
    strided share of a permutation padded to a multiple of the world size.
    """

    def __init__(self, size: int, seed: int, shuffle: bool = True) -> None:
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.rank, self.world = get_rank(), get_world_size()
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch and the number of this rank's samples to skip (resume)."""
        self.epoch, self.start = epoch, start

    def _indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.size, generator=g).tolist()
        else:
            order = list(range(self.size))
        per_rank = -(-self.size // self.world)
        order += order[: per_rank * self.world - self.size]
        return order[self.rank :: self.world]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for index in self._indices()[self.start :]:
            yield self.epoch, index

    def __len__(self) -> int:
        return -(-self.size // self.world) - self.start


class ShardSampler(Sampler):
    """This rank's contiguous share of `range(size)`, in order, without padding.

    Rank r of W takes [r * size // W, (r + 1) * size // W): every index exactly once over all
    ranks (shares differ by at most one), so summed or gathered evaluator state equals a
    single-process evaluation's; concatenated in rank order, the shares are the dataset's order
    (results files and score ties come out as in one process). DistributedSampler would instead
    pad with repeated samples, counting them twice.
    """

    def __init__(self, size: int, rank: int | None = None, world: int | None = None) -> None:
        self.rank = get_rank() if rank is None else rank
        self.world = get_world_size() if world is None else world
        if not 0 <= self.rank < self.world:
            raise ValueError(f"rank {self.rank} outside a world of {self.world} processes")
        self.begin = self.rank * size // self.world
        self.end = (self.rank + 1) * size // self.world

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.begin, self.end))

    def __len__(self) -> int:
        return self.end - self.begin


class SeededDataset(Dataset):
    """Wraps a dataset so each (epoch, index) item is augmented under its own RNG seed.

    A key may carry a third number, the copy of the image within the epoch (repeat-factor
    sampling, `RepeatFactorSampler`): copy 0 has the seed of (epoch, index), later copies their
    own. `fork_rng` keeps the process's global RNG (dropout, ...) untouched by data augmentation.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, ...]) -> Any:
        epoch, index, *repeat = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self._item_seed(epoch, index, *repeat))
            return self.dataset[index]

    def _item_seed(self, epoch: int, index: int, repeat: int = 0) -> int:
        seed = (self.seed * 1_000_003 + epoch) * 10_000_019 + index
        # Copy 0 keeps the seed the uniform sampler gives the item; copy k adds k times a large
        # odd constant (the golden ratio's 64-bit fraction), so copies are augmented apart.
        return seed if not repeat else (seed + repeat * 0x9E3779B97F4A7C15) % 2**63


class CorruptSkippingDataset(SeededDataset):
    """`SeededDataset` that answers a sample raising `CorruptImageError` with the next decodable
    one, (i + 1) % len, augmented under the seed of the requested (epoch, i).

    Items are `(sample, errors)`: `errors` holds the message (naming the file) of each corrupt
    sample passed over, for `SkipReportingCollate` to carry to the main process. A dataset in
    which no sample decodes raises the last error.
    """

    def __getitem__(self, key: tuple[int, ...]) -> tuple[Any, list[str]]:
        epoch, index, *repeat = key
        errors: list[str] = []
        for offset in range(len(self.dataset)):
            with torch.random.fork_rng(devices=[]):
                # Reseeded on every attempt: a decode that fails part-way may have drawn numbers.
                torch.manual_seed(self._item_seed(epoch, index, *repeat))
                try:
                    return self.dataset[(index + offset) % len(self.dataset)], errors
                except CorruptImageError as err:
                    errors.append(str(err))
                    last = err
        raise CorruptImageError(
            f"data.skip_corrupt=true but none of the {len(self.dataset)} samples decodes; last error: {last}"
        ) from last


class SkipReportingCollate:
    """Collates the samples of `CorruptSkippingDataset` items; returns (batch, error messages).

    A class rather than a closure so that worker processes started by spawn can unpickle it.
    """

    def __init__(self, collate_fn: Callable) -> None:
        self.collate_fn = collate_fn

    def __call__(self, items: list[tuple[Any, list[str]]]) -> tuple[Any, list[str]]:
        return self.collate_fn([sample for sample, _ in items]), [e for _, errors in items for e in errors]


class CorruptSkippingLoader(DataLoader):
    """Yields the batches of `SkipReportingCollate` and logs what was skipped, in the main process
    (counts from every worker): a warning at the first skip of an epoch, naming the file, and at
    the epoch's end the count of corrupt samples with the first few messages.
    """

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        epoch = getattr(self.sampler, "epoch", None)
        skipped: list[str] = []
        for batch, errors in super().__iter__():
            if errors and not skipped:
                log.warning("epoch %s: skipping a corrupt sample (data.skip_corrupt=true): %s",
                            epoch, errors[0])
            skipped += [e for e in errors if e not in skipped]
            yield batch
        if skipped:
            shown = "; ".join(skipped[:_SHOWN_SKIPS]) + ("; ..." if len(skipped) > _SHOWN_SKIPS else "")
            log.warning(
                "epoch %s: skipped %d corrupt samples, each replaced by the next sample "
                "(data.skip_corrupt=true): %s", epoch, len(skipped), shown,
            )


@dataclass(frozen=True)
class LoaderOptions:
    """How batches are produced (the `data` config group): worker processes; page-locked
    batches for CUDA (they copy asynchronously); workers kept between epochs (started once);
    training samples that do not decode replaced and logged instead of stopping the run."""

    num_workers: int = 0
    pin_memory: bool = False
    persistent_workers: bool = True
    skip_corrupt: bool = False


def build_train_loader(
    dataset: Dataset,
    batch_size: int,
    collate_fn: Callable,
    seed: int,
    options: LoaderOptions = LoaderOptions(),
    repeat_factors: torch.Tensor | None = None,
) -> DataLoader:
    """Loader over a `ResumableSampler`, or a `RepeatFactorSampler` when `repeat_factors`
    (float (N,) >= 1, one per sample) are given; call `loader.sampler.set_epoch(e, start)` each
    epoch.

    With `options.skip_corrupt`, samples raising `CorruptImageError` are replaced and logged (see
    `CorruptSkippingDataset`); otherwise the error, which names the file, stops training.
    """
    if len(dataset) < batch_size:
        raise ValueError(
            f"the training set has {len(dataset)} samples, fewer than data.batch_size={batch_size}; "
            "lower data.batch_size or add data"
        )
    if options.skip_corrupt:
        loader_type, items = CorruptSkippingLoader, CorruptSkippingDataset(dataset, seed)
        collate_fn = SkipReportingCollate(collate_fn)
    else:
        loader_type, items = DataLoader, SeededDataset(dataset, seed)
    if repeat_factors is None:
        sampler: Sampler = ResumableSampler(len(dataset), seed)
    else:
        if len(repeat_factors) != len(dataset):
            raise ValueError(f"{len(repeat_factors)} repeat factors for {len(dataset)} samples")
        sampler = RepeatFactorSampler(repeat_factors, seed)
    return loader_type(
        items,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=collate_fn,
        num_workers=options.num_workers,
        pin_memory=options.pin_memory,
        drop_last=True,
        persistent_workers=options.persistent_workers and options.num_workers > 0,
        worker_init_fn=init_worker,
        # Its own generator: creating an iterator must not draw from the global RNG, or a
        # resumed run's dropout would diverge from the uninterrupted run's.
        generator=torch.Generator().manual_seed(seed),
    )


def build_eval_loader(
    dataset: Dataset, batch_size: int, collate_fn: Callable, options: LoaderOptions = LoaderOptions()
) -> DataLoader:
    """Sequential loader for evaluation: under DDP, this rank's `ShardSampler` share, in order
    (each sample on exactly one rank; a share may be empty when there are more ranks than samples).
    """
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=ShardSampler(len(dataset)),
        collate_fn=collate_fn,
        num_workers=options.num_workers,
        pin_memory=options.pin_memory,
        worker_init_fn=init_worker,
    )
