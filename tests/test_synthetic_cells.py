"""The synthetic dataset's cells mode: many small touching objects with exact instance targets."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as nnf

from segtrain.data.datasets.panoptic import masks_to_boxes
from segtrain.data.datasets.synthetic import SyntheticDataset
from segtrain.data.datasets.synthetic_cells import CELL_KINDS


def _cells(**kwargs) -> SyntheticDataset:
    return SyntheticDataset(**{"num_samples": 6, "num_classes": 3, "max_shapes": 80, "mode": "cells",
                               **kwargs})


def test_cells_are_deterministic_and_differ_by_split_and_seed():
    a, b = _cells()[3], _cells()[3]
    assert torch.equal(a[0], b[0])
    assert all(torch.equal(torch.as_tensor(a[1][k]), torch.as_tensor(b[1][k])) for k in a[1])
    assert not torch.equal(a[0], _cells(split="val")[3][0])
    assert not torch.equal(a[0], _cells(seed=1)[3][0])


def test_many_small_cells_of_each_kind():
    ds = _cells(num_classes=4)
    assert ds.meta.classes == ["background", *CELL_KINDS]
    counts, areas, labels = [], [], []
    for i in range(len(ds)):
        target = ds[i][1]
        counts.append(len(target["labels"]))
        areas.append(target["masks"].flatten(1).sum(1))
        labels.append(target["labels"])
    assert min(counts) >= 20 and max(counts) <= 80
    areas = torch.cat(areas).float()
    # radius 4..12 px at 128 px: areas between a partly hidden small cell and a full large one
    assert areas.min() >= 5 and areas.max() <= torch.pi * 13**2 and areas.median() < 200
    assert set(torch.cat(labels).tolist()) == {1, 2, 3}


def test_cells_touch_and_masks_are_disjoint():
    for i in range(4):
        masks = _cells()[i][1]["masks"]
        assert masks.sum(0).max() <= 1  # one owner per pixel
        grown = nnf.max_pool2d(masks.float()[:, None], 3, 1, 1)[:, 0]
        adjacent = (grown.flatten(1) @ masks.float().flatten(1).T) > 0
        adjacent.fill_diagonal_(False)
        assert adjacent.any(1).float().mean() > 0.5  # most cells touch another


def test_cell_targets_are_consistent():
    image, target = _cells()[2]
    masks, labels = target["masks"], target["labels"]
    assert image.dtype == torch.uint8 and image.shape == (3, 128, 128)
    assert masks.dtype == torch.bool and masks.flatten(1).any(1).all()
    assert torch.equal(target["boxes"], masks_to_boxes(masks))
    assert torch.equal(target["iscrowd"], torch.zeros(len(labels), dtype=torch.int64))
    semantic = (masks.long() * labels.view(-1, 1, 1)).sum(0)
    assert torch.equal(target["semantic"], semantic)
    assert target["orig_size"].tolist() == [128, 128]


def test_cells_mode_refuses_stuff_and_too_many_kinds():
    with pytest.raises(ValueError, match="cells"):
        _cells(num_classes=5)
    with pytest.raises(ValueError, match="cells"):
        _cells(stuff_classes=2, num_classes=5)
    with pytest.raises(ValueError, match="mode"):
        SyntheticDataset(mode="blobs")


def test_cells_config_composes(compose_cfg):
    from hydra.utils import instantiate

    cfg = compose_cfg("train", ["dataset=synthetic_cells", "dataset.val.num_samples=2"])
    assert cfg.dataset.annotations == "instance"
    val = instantiate(cfg.dataset.val)
    assert val.mode == "cells" and len(val[0][1]["labels"]) >= 20
