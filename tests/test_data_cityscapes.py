"""Cityscapes' label id -> train id mapping (uint8) and the item contract through the fused transforms."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from segtrain.data.datasets.cityscapes import CityscapesSegmentation, label_ids_to_train_ids
from segtrain.data.transforms.presets import RandomCrop, RandomResize, semantic_train_transforms

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
from make_fixtures import write_cityscapes  # noqa: E402

# cityscapesScripts' helpers/labels.py, id -> trainId, written out independently of the loader.
OFFICIAL_TRAIN_ID = {
    0: 255, 1: 255, 2: 255, 3: 255, 4: 255, 5: 255, 6: 255, 7: 0, 8: 1, 9: 255, 10: 255, 11: 2, 12: 3,
    13: 4, 14: 255, 15: 255, 16: 255, 17: 5, 18: 255, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11,
    25: 12, 26: 13, 27: 14, 28: 15, 29: 255, 30: 255, 31: 16, 32: 17, 33: 18,
}


@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8])
def test_uint8_mapping_equals_the_official_table(dtype):
    ids = torch.tensor(list(OFFICIAL_TRAIN_ID), dtype=dtype).repeat(3, 1)  # every id, (3, 34)
    train_ids = label_ids_to_train_ids(ids)
    assert train_ids.dtype == torch.uint8 and train_ids.shape == (3, 34)
    assert train_ids[0].tolist() == list(OFFICIAL_TRAIN_ID.values())
    strided = label_ids_to_train_ids(ids.t())  # a non-contiguous map
    assert torch.equal(strided, train_ids.t())


@pytest.mark.parametrize("bad", [34, 255, -1, 1000])
def test_mapping_rejects_values_outside_the_table_naming_them(bad):
    ids = torch.tensor([[7, 8], [bad, 26]])
    message = rf"lbl\.png holds values \[{bad}\]; expected Cityscapes label ids 0\.\.33"
    with pytest.raises(ValueError, match=message):
        label_ids_to_train_ids(ids, "lbl.png")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return write_cityscapes(tmp_path_factory.mktemp("cs"), split="train", size=(64, 128))


def test_items_yield_int64_semantic_with_and_without_transforms(root):
    transforms = semantic_train_transforms(scale=(128, 64), scale_range=(0.5, 2.0), crop_size=(32, 48))
    for dataset in (CityscapesSegmentation(root, "train"), CityscapesSegmentation(root, "train", transforms)):
        image, target = dataset[0]
        assert type(target["semantic"]) is tv_tensors.Mask and target["semantic"].dtype == torch.int64
        assert image.dtype == torch.uint8 and image.shape[-2:] == target["semantic"].shape
        assert set(target["semantic"].unique().tolist()) <= set(OFFICIAL_TRAIN_ID.values())


def test_items_through_the_fused_pipeline_equal_int64_resize_then_crop(root):
    """The uint8 labels and the window resize change no label and at most 1 grey level per pixel
    against the previous pipeline (int64 labels, whole-frame resize, then crop)."""
    dataset = CityscapesSegmentation(root, "train", semantic_train_transforms(
        scale=(128, 64), scale_range=(0.5, 2.0), crop_size=(32, 48), cat_max_ratio=0.75))
    plain = CityscapesSegmentation(root, "train")
    previous = v2.Compose(
        [RandomResize((128, 64), (0.5, 2.0)), RandomCrop((32, 48), 0.75), v2.RandomHorizontalFlip()]
    )
    for index in range(len(dataset)):
        for seed in range(4):
            torch.manual_seed(seed)
            image, target = dataset[index]
            torch.manual_seed(seed)
            ref_image, ref_target = previous(*plain[index])
            assert torch.equal(target["semantic"], ref_target["semantic"])
            assert int((image.int() - ref_image.int()).abs().max()) <= 1
