"""Repeat-factor sampling (LVIS, Gupta et al. 2019; detectron2's RepeatFactorTrainingSampler).

Per category c, f(c) is the fraction of training images that contain c, and r(c) =
max(1, sqrt(t / f(c))) for a threshold t; an image's factor r(I) is the largest r(c) of its
categories (1 for an image without any). Each epoch holds every image floor(r) times plus once
more with probability frac(r), so rare categories are seen about r times as often.

As `ResumableSampler`'s permutation, the epoch's list of indices is a pure function of (seed,
epoch): the extra draws and the shuffle come from one generator seeded with them. A resumed run
therefore sees the same remaining batches, whatever the number of loader workers, and epochs
may differ in length (`epoch_length`), which the Trainer reads to count `max_epochs`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler

from segtrain.data.datasets.label_scan import untransformed
from segtrain.utils.distributed import get_rank, get_world_size

log = logging.getLogger("segtrain.data")
SAMPLERS = ("uniform", "repeat_factor")


def repeat_factors(image_categories: Sequence[Sequence[int]], threshold: float) -> torch.Tensor:
    """float64 (N,) repeat factors r(I) >= 1 from each image's categories (any ints; repeats and
    order do not matter). `threshold` is t in r(c) = max(1, sqrt(t / f(c)))."""
    if not (isinstance(threshold, (int, float)) and not isinstance(threshold, bool)
            and 0.0 < threshold <= 1.0):
        raise ValueError(f"repeat threshold {threshold!r}: expected a fraction of images in (0, 1]")
    per_image = [set(int(c) for c in cats) for cats in image_categories]
    total = len(per_image)
    images_with: dict[int, int] = {}
    for cats in per_image:
        for c in cats:
            images_with[c] = images_with.get(c, 0) + 1
    category_factor = {
        c: max(1.0, math.sqrt(threshold / (count / total))) for c, count in images_with.items()
    }
    return torch.tensor(
        [max((category_factor[c] for c in cats), default=1.0) for cats in per_image],
        dtype=torch.float64,
    )


class RepeatFactorSampler(Sampler):
    """(epoch, index, repeat) triples of repeat-factor epochs, sharded across ranks, resumable.

    `repeat` numbers the copies of an image within the epoch (0, 1, ...): `SeededDataset`
    augments each copy under its own seed. The epoch's list is padded to a multiple of the world
    size and each rank takes a strided share, as `ResumableSampler` does.
    """

    def __init__(self, factors: torch.Tensor, seed: int) -> None:
        factors = torch.as_tensor(factors, dtype=torch.float64)
        if factors.ndim != 1 or len(factors) == 0 or bool((factors < 1).any()):
            raise ValueError("repeat factors: expected a non-empty 1-D tensor of values >= 1")
        self.factors, self.seed = factors, int(seed)
        self._whole, self._frac = factors.floor(), factors - factors.floor()
        self.rank, self.world = get_rank(), get_world_size()
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch and the number of this rank's samples to skip (resume)."""
        self.epoch, self.start = epoch, start

    def _generator(self, epoch: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)

    def _counts(self, g: torch.Generator) -> torch.Tensor:
        """int64 (N,) copies of each image: floor(r), plus one with probability frac(r)."""
        extra = torch.rand(len(self.factors), generator=g, dtype=torch.float64) < self._frac
        return (self._whole + extra).long()

    def epoch_indices(self, epoch: int) -> list[int]:
        """The whole epoch's shuffled image indices (all ranks, before padding)."""
        g = self._generator(epoch)
        # numpy's repeat: torch.repeat_interleave costs milliseconds even on a few items
        indices = torch.from_numpy(np.repeat(np.arange(len(self.factors)), self._counts(g).numpy()))
        return indices[torch.randperm(len(indices), generator=g)].tolist()

    def epoch_length(self, epoch: int) -> int:
        """This rank's samples in `epoch` (from its start), without building the list."""
        total = int(self._counts(self._generator(epoch)).sum())
        return -(-total // self.world)

    def _shard(self) -> list[tuple[int, int]]:
        order = self.epoch_indices(self.epoch)
        seen: dict[int, int] = {}
        keyed = []
        for index in order:  # the copy number, counted over the whole epoch before sharding
            keyed.append((index, seen.get(index, 0)))
            seen[index] = keyed[-1][1] + 1
        per_rank = -(-len(keyed) // self.world)
        keyed += keyed[: per_rank * self.world - len(keyed)]
        return keyed[self.rank :: self.world]

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        for index, repeat in self._shard()[self.start :]:
            yield self.epoch, index, repeat

    def __len__(self) -> int:
        return self.epoch_length(self.epoch) - self.start


def dataset_image_categories(dataset: Any) -> list[list[int]]:
    """Each training image's categories (instance labels, or semantic classes present).

    From `dataset.image_categories()` when the dataset answers from its annotations (COCO/LVIS
    JSONs: no mask decoded); otherwise every target is read once with the dataset's transforms
    off (logged: on a large dataset this is slow), taking `labels` or else the values of
    `semantic` other than its `ignore_index`.
    """
    answer = getattr(dataset, "image_categories", None)
    if callable(answer):
        return [list(map(int, cats)) for cats in answer()]
    log.info("data.sampler=repeat_factor: %s has no image_categories(); reading its %d targets once "
             "to find the categories of each image", type(dataset).__name__, len(dataset))
    ignore = getattr(getattr(dataset, "meta", None), "ignore_index", 255)
    found: list[list[int]] = []
    with untransformed(dataset), torch.random.fork_rng(devices=[]):
        for i in range(len(dataset)):
            _, target = dataset[i]
            found.append(target_categories(target, ignore, type(dataset).__name__))
    return found


def target_categories(target: dict, ignore_index: int = 255, source: str = "the dataset") -> list[int]:
    """The categories of one target: its instance `labels`, else the classes of `semantic`."""
    if "labels" in target:
        return sorted(set(torch.as_tensor(target["labels"]).reshape(-1).tolist()))
    if "semantic" in target:
        values = torch.unique(torch.as_tensor(target["semantic"])).tolist()
        return [v for v in values if v != ignore_index]
    raise ValueError(
        f"data.sampler=repeat_factor needs each image's categories, but {source}'s targets have "
        f"neither instance 'labels' nor a 'semantic' map (keys: {sorted(target)}); use "
        "data.sampler=uniform"
    )


def describe_repeat_factors(factors: torch.Tensor, threshold: float, first_epoch: int) -> str:
    """One log line: images with r > 1, the largest r, and the first epoch's length."""
    repeated = int((factors > 1).sum())
    return (
        f"data.sampler=repeat_factor (data.repeat_threshold={threshold:g}): {repeated} of "
        f"{len(factors)} images have r > 1, max r {float(factors.max()):.2f}, mean r "
        f"{float(factors.mean()):.3f}; epoch 0 holds {first_epoch} samples (uniform: {len(factors)})"
    )
