"""The training loader's corrupt-sample handling: an error naming the file, or logged skips."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset

from segtrain.data.codecs.image_io import CorruptImageError
from segtrain.data.datasets.cityscapes import CityscapesSegmentation
from segtrain.data.loader import CorruptSkippingDataset, LoaderOptions, build_train_loader

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from make_fixtures import write_cityscapes  # noqa: E402


def _file_names(batch: list) -> list[str]:
    return [target["file_name"] for _, target in batch]


@pytest.fixture
def cityscapes(tmp_path) -> tuple[CityscapesSegmentation, Path]:
    """6 frames, the third one's image truncated."""
    root = write_cityscapes(tmp_path, split="train", per_city=3)
    dataset = CityscapesSegmentation(root, split="train")
    corrupt = dataset._records[2][1]
    corrupt.write_bytes(corrupt.read_bytes()[:60])
    return dataset, corrupt


def _epoch(dataset, skip_corrupt: bool, num_workers: int = 0, epoch: int = 0) -> list[str]:
    options = LoaderOptions(num_workers=num_workers, persistent_workers=False, skip_corrupt=skip_corrupt)
    loader = build_train_loader(dataset, 2, list, seed=3, options=options)
    loader.sampler.set_epoch(epoch)
    return [name for batch in loader for name in _file_names(batch)]


def test_corrupt_image_fails_with_its_file_name_when_skipping_is_off(cityscapes):
    dataset, corrupt = cityscapes
    with pytest.raises(CorruptImageError, match=corrupt.name):
        _epoch(dataset, skip_corrupt=False)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_skip_corrupt_replaces_the_sample_by_the_next_and_logs_count_and_file(
    cityscapes, caplog, num_workers
):
    dataset, corrupt = cityscapes
    stems = [record[0] for record in dataset._records]
    with caplog.at_level(logging.WARNING, logger="segtrain.data"):
        names = _epoch(dataset, skip_corrupt=True, num_workers=num_workers)
    assert len(names) == len(dataset)
    assert stems[2] not in names
    assert names.count(stems[3]) == 2  # index 2 was answered by index 3
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2, messages  # the first skip, then the epoch's summary
    assert corrupt.name in messages[0]
    assert "skipped 1 corrupt samples" in messages[1] and corrupt.name in messages[1]


def test_skip_corrupt_order_is_deterministic_and_matches_the_clean_order(cityscapes, caplog):
    dataset, _ = cityscapes
    stems = [record[0] for record in dataset._records]
    first, again = _epoch(dataset, True), _epoch(dataset, True)
    assert first == again
    # Same permutation as without skipping, with frame 2 replaced by frame 3.
    clean = build_train_loader(dataset, 2, list, seed=3)
    order = [index for _, index in clean.sampler]
    assert first == [stems[3] if i == 2 else stems[i] for i in order]
    # Workers see the same order, and so does every later epoch on its own permutation.
    assert _epoch(dataset, True, num_workers=2, epoch=1) == _epoch(dataset, True, epoch=1)


def test_skip_corrupt_keeps_the_augmentation_seed_of_the_requested_item():
    """The replacement is augmented under the requested (epoch, index) seed, so it differs from
    the next sample's own draw: the epoch does not hold two identical crops."""
    class Noisy(Dataset):
        def __len__(self) -> int:
            return 3

        def __getitem__(self, index: int) -> float:
            if index == 0:
                raise CorruptImageError("cannot decode /data/bad.png")
            return float(torch.rand(()))

    items = CorruptSkippingDataset(Noisy(), seed=0)
    (value, errors), (own, no_errors) = items[(0, 0)], items[(0, 1)]
    assert errors == ["cannot decode /data/bad.png"] and no_errors == []
    assert value != own
    assert items[(0, 0)] == (value, errors)


def test_skip_corrupt_raises_when_no_sample_decodes():
    class Broken(Dataset):
        def __len__(self) -> int:
            return 2

        def __getitem__(self, index: int) -> None:
            raise CorruptImageError(f"cannot decode /data/{index}.png")

    with pytest.raises(CorruptImageError, match="none of the 2 samples decodes.*1.png"):
        CorruptSkippingDataset(Broken(), seed=0)[(0, 0)]
