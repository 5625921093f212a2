"""Data loaders whose order and augmentations are a pure function of (seed, epoch, sample index).

That makes a resumed run see exactly the batches the uninterrupted run would have seen, whatever
the number of workers, and lets a run restart mid-epoch without loading the skipped samples.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from segtrain.utils.distributed import get_rank, get_world_size


def ignore_stop_signals(worker_id: int) -> None:
    """Loader workers leave SIGINT/SIGTERM to the main process.

    Ctrl-C and cluster schedulers signal the whole process group; a worker killed by the signal
    would make the main process raise mid-step instead of writing its checkpoint and stopping.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


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


class SeededDataset(Dataset):
    """Wraps a dataset so each (epoch, index) item is augmented under its own RNG seed.

    `fork_rng` keeps the process's global RNG (dropout, ...) untouched by data augmentation.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + epoch) * 10_000_019 + index)
            return self.dataset[index]


def build_train_loader(
    dataset: Dataset,
    batch_size: int,
    collate_fn: Callable,
    seed: int,
    num_workers: int = 0,
    pin_memory: bool = False,
    persistent_workers: bool = True,
) -> DataLoader:
    """Loader over a `ResumableSampler`; call `loader.sampler.set_epoch(e, start)` each epoch."""
    if len(dataset) < batch_size:
        raise ValueError(
            f"the training set has {len(dataset)} samples, fewer than data.batch_size={batch_size}; "
            "lower data.batch_size or add data"
        )
    return DataLoader(
        SeededDataset(dataset, seed),
        batch_size=batch_size,
        sampler=ResumableSampler(len(dataset), seed),
        collate_fn=collate_fn,
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=True,
        persistent_workers=persistent_workers and num_workers > 0,
        worker_init_fn=ignore_stop_signals,
        # Its own generator: creating an iterator must not draw from the global RNG, or a
        # resumed run's dropout would diverge from the uninterrupted run's.
        generator=torch.Generator().manual_seed(seed),
    )


def build_eval_loader(
    dataset: Dataset,
    batch_size: int,
    collate_fn: Callable,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """Sequential loader for evaluation (every sample once, in order)."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        collate_fn=collate_fn,
        num_workers=num_workers,
        pin_memory=pin_memory,
        worker_init_fn=ignore_stop_signals,
    )
