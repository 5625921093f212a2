"""Rare-class crops: off by default (crops bit for bit as before), otherwise the rare class shows
up in far more crops, deterministically under the loader's seeding, also through ResizeCrop."""

from __future__ import annotations

import zlib

import pytest
import torch
from torchvision import tv_tensors

from segtrain.data.transforms.presets import RandomCrop, semantic_train_transforms

RARE = 5


def _scene() -> tuple[tv_tensors.Image, dict]:
    """48x64 labels of classes 0..2, a 4x4 square of class 5 near the bottom-right corner."""
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (48, 64), generator=g)
    labels[:24, :32] = 0
    labels[40:44, 50:54] = RARE
    image = tv_tensors.Image(torch.randint(0, 256, (3, 48, 64), generator=g, dtype=torch.uint8))
    return image, {"semantic": tv_tensors.Mask(labels)}


def _checksums(transform, seeds=range(12)) -> list[int]:
    out = []
    for seed in seeds:
        torch.manual_seed(seed)
        image, target = transform(*_scene())
        out.append(zlib.crc32(image.numpy().tobytes() + target["semantic"].numpy().tobytes()))
    return out


# Outputs of the crops before the option existed (commit 0cf1653), seeds 0..11.
BEFORE = {
    "crop": [565771385, 3296558733, 2331635325, 2784870363, 3782839744, 936664266, 1518123254,
             103632101, 3815316395, 4198806754, 3222966568, 1082961714],
    "resize_crop": [2293633513, 3622787481, 4011379669, 1727060897, 3799385628, 1738935230,
                    2889953458, 414324812, 1107551812, 402894725, 2094045645, 1249461401],
}


def test_default_crops_are_bitwise_those_before_the_option():
    assert _checksums(RandomCrop((16, 20), cat_max_ratio=0.75)) == BEFORE["crop"]
    # rare_classes given but probability 0: still no extra draw
    assert _checksums(RandomCrop((16, 20), cat_max_ratio=0.75, rare_classes=[RARE])) == BEFORE["crop"]
    fused = semantic_train_transforms(crop_size=(16, 20), scale_range=(0.5, 2.0), cat_max_ratio=0.75)
    assert _checksums(fused) == BEFORE["resize_crop"]


def _share_with_rare(transform, n: int = 200) -> float:
    hits = 0
    for seed in range(n):
        torch.manual_seed(seed)
        _, target = transform(*_scene())
        hits += bool((target["semantic"] == RARE).any())
    return hits / n


@pytest.mark.parametrize("resize", [False, True])
def test_rare_class_appears_in_far_more_crops(resize):
    scale = {"scale_range": (0.75, 1.5)} if resize else {}
    plain = semantic_train_transforms(crop_size=(16, 20), cat_max_ratio=0.75, hflip_prob=0.0, **scale)
    rare = semantic_train_transforms(crop_size=(16, 20), cat_max_ratio=0.75, hflip_prob=0.0,
                                     rare_classes=[RARE, 7], rare_class_prob=0.5, **scale)
    before, after = _share_with_rare(plain), _share_with_rare(rare)
    assert before < 0.25
    assert after >= 0.5 and after > 2.5 * before
    always = semantic_train_transforms(crop_size=(16, 20), hflip_prob=0.0, rare_classes=[RARE],
                                       rare_class_prob=1.0, **scale)
    assert _share_with_rare(always, n=50) == 1.0  # every window centred on the square holds it


def test_rare_crops_are_a_function_of_the_seed():
    transform = RandomCrop((16, 20), cat_max_ratio=0.75, rare_classes=[RARE], rare_class_prob=0.5)
    assert _checksums(transform) == _checksums(transform)
    assert _checksums(transform) != BEFORE["crop"]


def test_image_without_the_rare_class_falls_back_to_the_usual_crop():
    image, target = _scene()
    target["semantic"][target["semantic"] == RARE] = 1
    crop = RandomCrop((16, 20), rare_classes=[RARE], rare_class_prob=1.0)
    torch.manual_seed(0)
    out_image, out_target = crop(image, target)
    assert out_image.shape[-2:] == (16, 20) and not (out_target["semantic"] == RARE).any()


@pytest.mark.parametrize("kwargs, match", [
    ({"rare_class_prob": 0.5}, "needs rare_classes"),
    ({"rare_classes": [3], "rare_class_prob": 1.5}, r"rare_class_prob=1.5: expected a probability"),
])
def test_bad_rare_crop_options_are_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RandomCrop(16, **kwargs)


def test_rare_crop_needs_a_crop():
    with pytest.raises(ValueError, match="set crop_size"):
        semantic_train_transforms(rare_classes=[1], rare_class_prob=0.5)
