"""Training transforms: maps and boxes follow the image, MMSeg's crop/resize/photometric rules, padding
values, panoptic sanitizing, determinism and the dataset presets' recipes."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torchvision import tv_tensors
from torchvision.transforms import v2

from segtrain.data.datasets.panoptic import masks_to_boxes, panoptic_targets
from segtrain.data.meta import DatasetMeta, default_palette
from segtrain.data.transforms.photometric import _affine
from segtrain.data.transforms.presets import (
    PadToMultiple,
    PadToSize,
    PanopticMap,
    PhotoMetricDistortion,
    RandomCrop,
    RandomResize,
    RandomScale,
    SanitizePanoptic,
    panoptic_train_transforms,
    semantic_train_transforms,
)

H, W = 48, 64  # a 4 x 4 grid of 12 x 16 blocks


def _scene() -> tuple[tv_tensors.Image, dict]:
    """Blocks whose class and instance id are written into the image: channel 0 = 40 * class,
    channel 1 = 10 * instance id, so any misplaced map or box shows as a mismatch."""
    block = torch.arange(16).view(4, 4).repeat_interleave(12, 0).repeat_interleave(16, 1)
    semantic = (block * 7) % 5 + 1  # classes 1..5, neighbours differ
    panoptic = block + 1
    image = torch.stack([semantic * 40, panoptic * 10, torch.full_like(block, 7)]).to(torch.uint8)
    masks = panoptic.unsqueeze(0) == torch.arange(1, 17).view(-1, 1, 1)
    target = {
        "semantic": tv_tensors.Mask(semantic),
        "panoptic": PanopticMap(panoptic),
        "masks": tv_tensors.Mask(masks),
        "boxes": tv_tensors.BoundingBoxes(masks_to_boxes(masks), format="XYXY", canvas_size=(H, W)),
        "labels": torch.arange(1, 17),
    }
    return tv_tensors.Image(image), target


def _assert_follows(image: torch.Tensor, target: dict) -> None:
    """Every map and box agrees with the image pixel for pixel; padding is 0 / 255 / 0 / False."""
    semantic, panoptic, masks = target["semantic"], target["panoptic"], target["masks"]
    assert image.shape[-2:] == semantic.shape == panoptic.shape == masks.shape[-2:]
    inside = semantic != 255
    assert torch.equal(image[0][inside], (semantic[inside] * 40).to(torch.uint8))
    assert torch.equal(image[1][inside], (panoptic[inside] * 10).to(torch.uint8))
    assert bool((image[:, ~inside] == 0).all()) and bool((panoptic[~inside] == 0).all())
    assert not masks[:, ~inside].any()
    assert torch.equal(masks, panoptic.unsqueeze(0) == target["labels"].view(-1, 1, 1))
    visible = masks.flatten(1).any(1)  # instances cut away keep a degenerate box until sanitized
    assert torch.equal(target["boxes"][visible], masks_to_boxes(masks[visible]))
    assert tuple(target["boxes"].canvas_size) == tuple(image.shape[-2:])


@pytest.mark.parametrize(
    "transform",
    [
        RandomCrop(24),
        RandomCrop((20, 30), cat_max_ratio=0.75),
        RandomCrop((60, 70)),  # larger than the image: pads
        v2.RandomHorizontalFlip(1.0),
        v2.RandomVerticalFlip(1.0),
        PadToMultiple(40),
        v2.Compose([RandomCrop(30), v2.RandomHorizontalFlip(1.0), v2.SanitizeBoundingBoxes()]),
    ],
    ids=["crop", "crop_cat_max_ratio", "crop_pads", "hflip", "vflip", "pad_multiple", "crop_flip"],
)
def test_geometric_transforms_move_masks_panoptic_and_boxes_with_the_image(transform):
    torch.manual_seed(0)
    for _ in range(5):
        image, target = transform(*_scene())
        _assert_follows(image, target)


@pytest.mark.parametrize("transform", [RandomScale((0.6, 1.7)), RandomResize((2048, 512), (0.05, 0.2))])
def test_resizes_keep_maps_aligned_with_the_bilinear_image(transform):
    torch.manual_seed(0)
    for _ in range(5):
        image, target = transform(*_scene())
        panoptic = target["panoptic"]
        assert image.shape[-2:] == panoptic.shape == target["masks"].shape[-2:]
        assert type(panoptic) is PanopticMap and panoptic.dtype == torch.int64
        assert set(panoptic.unique().tolist()) <= set(range(1, 17))  # nearest: no blended ids
        # Bilinear blurs block borders only: block centres match exactly, most pixels match.
        agree = (image[1] == (panoptic * 10).to(torch.uint8)).float().mean()
        assert agree > 0.6
        for mask, label in zip(target["masks"], target["labels"]):
            x1, y1, x2, y2 = masks_to_boxes(mask[None])[0].tolist()
            assert int(image[1, int(y1 + y2) // 2, int(x1 + x2) // 2]) == 10 * int(label)
        assert torch.equal(target["masks"], panoptic.unsqueeze(0) == target["labels"].view(-1, 1, 1))
        expected = masks_to_boxes(target["masks"])
        assert (target["boxes"] - expected).abs().max() <= 1.0


def test_random_scale_resizes_panoptic_with_nearest_and_keeps_aspect():
    image, target = RandomScale((0.5, 0.5))(*_scene())
    assert image.shape == (3, H // 2, W // 2)
    assert torch.equal(target["panoptic"], _scene()[1]["panoptic"][::2, ::2])


@pytest.mark.parametrize(
    "size, scale, ratio, expected",
    [
        ((375, 500), (2048, 512), 1.0, (512, 683)),  # the short edge binds: 512
        ((375, 500), (512, 2048), 1.0, (512, 683)),  # order of scale does not matter
        ((375, 500), (2048, 512), 0.5, (256, 341)),
        ((200, 2000), (2048, 512), 1.0, (205, 2048)),  # the long edge binds first
        ((1024, 2048), (2048, 1024), 0.75, (768, 1536)),  # Cityscapes at ratio 0.75
    ],
)
def test_random_resize_scales_relative_to_the_base_size_like_mmseg(size, scale, ratio, expected):
    image = tv_tensors.Image(torch.zeros(3, *size, dtype=torch.uint8))
    mask = tv_tensors.Mask(torch.zeros(size, dtype=torch.int64))
    out_image, out_mask = RandomResize(scale, (ratio, ratio))(image, mask)
    assert tuple(out_image.shape[-2:]) == tuple(out_mask.shape) == expected


def _dominated(labels: torch.Tensor, ratio: float = 0.75) -> bool:
    classes, counts = torch.unique(labels, return_counts=True)
    counts = counts[classes != 255]
    return len(counts) < 2 or float(counts.max()) >= ratio * float(counts.sum())


def test_cat_max_ratio_redraws_crops_one_class_dominates_ignore_excluded():
    # Left half: class 1 over ignore (one class once ignore is excluded); right half: classes
    # 1 and 2 in alternate columns. 25 of the 57 8x8 windows lie in the left half.
    labels = torch.full((8, 64), 255)
    labels[:4, :32] = 1
    labels[:, 32:] = 1 + torch.arange(32) % 2
    image = tv_tensors.Image(torch.zeros(3, 8, 64, dtype=torch.uint8))
    target = {"semantic": tv_tensors.Mask(labels)}
    counts = {}
    for ratio in (1.0, 0.75):
        torch.manual_seed(0)
        crop = RandomCrop(8, cat_max_ratio=ratio)
        counts[ratio] = sum(_dominated(crop(image, target)[1]["semantic"]) for _ in range(200))
    assert counts[1.0] > 60  # without the rule, dominated crops are common
    assert counts[0.75] <= 2  # with it, only when all 10 draws fail ((25/57)^10 per crop)


def test_crop_and_pad_fill_image_zero_semantic_ignore_panoptic_void():
    image0, target0 = _scene()
    for transform in (RandomCrop((60, 70)), PadToSize((60, 70))):
        image, target = transform(image0, target0)
        assert image.shape == (3, 60, 70)
        assert torch.equal(image[:, :H, :W], image0) and bool((image[:, H:] == 0).all())
        assert bool((image[:, :, W:] == 0).all())
        assert bool((target["semantic"][H:] == 255).all()) and bool((target["semantic"][:, W:] == 255).all())
        assert bool((target["panoptic"][H:] == 0).all()) and bool((target["panoptic"][:, W:] == 0).all())
        assert not target["masks"][:, H:].any() and not target["masks"][:, :, W:].any()
        assert torch.equal(target["boxes"], target0["boxes"])


@pytest.mark.parametrize("size", [(33, 50), (32, 64), (1, 1), (65, 31)])
def test_pad_to_multiple_makes_sides_divisible_and_keeps_boxes(size):
    image0 = tv_tensors.Image(torch.full((3, *size), 9, dtype=torch.uint8))
    semantic0 = tv_tensors.Mask(torch.ones(size, dtype=torch.int64))
    boxes0 = tv_tensors.BoundingBoxes([[0, 0, 1, 1]], format="XYXY", canvas_size=size)
    panoptic0 = PanopticMap(torch.ones(size, dtype=torch.int64))
    image, semantic, boxes, panoptic = PadToMultiple(32)(image0, semantic0, boxes0, panoptic0)
    height, width = image.shape[-2:]
    assert height % 32 == 0 and width % 32 == 0 and height - size[0] < 32 and width - size[1] < 32
    assert int((semantic == 255).sum()) == height * width - size[0] * size[1]
    assert int((image == 0).sum()) == 3 * (height * width - size[0] * size[1])
    assert int((panoptic == 0).sum()) == height * width - size[0] * size[1]
    assert torch.equal(boxes, boxes0) and tuple(boxes.canvas_size) == (height, width)


def _panoptic_scene() -> tuple[tv_tensors.Image, dict, DatasetMeta]:
    classes = ["sky", "road", "car", "person"]
    meta = DatasetMeta(classes=classes, palette=default_palette(4), thing_ids=[2, 3], stuff_ids=[0, 1])
    panoptic = torch.zeros(32, 64, dtype=torch.int64)
    panoptic[:16, :32], panoptic[16:, :32] = 1, 2  # sky, road (VOID elsewhere)
    panoptic[:16, 40:56] = 3  # a car
    panoptic[16:32, 56:64] = 4  # a crowd of people
    panoptic[20:30, 34:40] = 5  # another car
    ids, segment_classes = torch.tensor([1, 2, 3, 4, 5]), torch.tensor([0, 1, 2, 3, 2])
    target = panoptic_targets(panoptic, ids, segment_classes, torch.tensor([0, 0, 0, 1, 0]), meta)
    image = tv_tensors.Image((panoptic * 20).to(torch.uint8).expand(3, -1, -1).clone())
    return image, target, meta


def test_panoptic_pipeline_drops_segments_cut_away_and_stays_consistent():
    image0, target0, meta = _panoptic_scene()
    transform = panoptic_train_transforms(crop_size=(24, 24), scale_range=(0.5, 1.5), hflip_prob=0.5)
    torch.manual_seed(0)
    dropped = 0
    for _ in range(20):
        image, target = transform(image0, target0)
        assert type(target["panoptic"]) is PanopticMap
        segments = target["segments"]
        present = set(target["panoptic"].unique().tolist()) - {0}
        assert set(segments["ids"].tolist()) == present
        dropped += 5 - len(segments["ids"])
        rebuilt = panoptic_targets(
            target["panoptic"].contiguous(), segments["ids"], segments["classes"], segments["iscrowd"], meta
        )
        for key in ("semantic", "masks", "labels", "boxes", "iscrowd"):
            assert torch.equal(target[key], rebuilt[key]), key
        assert tuple(target["boxes"].canvas_size) == (24, 24)
    assert dropped > 0


def test_sanitize_panoptic_refuses_a_target_without_a_panoptic_map():
    image, target = _scene()
    del target["panoptic"]
    with pytest.raises(KeyError, match="SanitizePanoptic needs"):
        SanitizePanoptic()(image, target)


def test_photometric_distortion_changes_the_image_only():
    image0, target0 = _scene()
    transform = PhotoMetricDistortion()
    torch.manual_seed(0)
    changed = 0
    for _ in range(20):
        image, target = transform(image0, target0)
        assert isinstance(image, tv_tensors.Image) and image.dtype == torch.uint8
        assert image.shape == image0.shape
        changed += not torch.equal(image, image0)
        for key in ("semantic", "panoptic", "masks", "boxes", "labels"):
            assert torch.equal(target[key], target0[key]) and type(target[key]) is type(target0[key]), key
    assert changed >= 15  # each of 4 steps at p=0.5: unchanged only 1 time in 16


def test_photometric_brightness_is_mmseg_additive_delta():
    image0 = tv_tensors.Image(torch.randint(40, 200, (3, 16, 16), dtype=torch.uint8))
    transform = PhotoMetricDistortion(contrast_range=(1, 1), saturation_range=(1, 1), hue_delta=0, prob=1.0)
    torch.manual_seed(0)
    deltas = set()
    for _ in range(10):
        diff = transform(image0).int() - image0.int()
        assert bool((diff == diff.flatten()[0]).all())  # one shift for every pixel, not a product
        deltas.add(int(diff.flatten()[0]))
    assert len(deltas) > 3 and max(abs(d) for d in deltas) <= 32


def test_photometric_distortion_refuses_float_images():
    with pytest.raises(TypeError, match="uint8"):
        PhotoMetricDistortion(prob=1.0)(tv_tensors.Image(torch.rand(3, 4, 4)))


def test_pipeline_is_deterministic_under_a_seed():
    transform = semantic_train_transforms(
        crop_size=32, scale=(64, 48), scale_range=(0.5, 2.0), photometric=True
    )

    def run(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(seed)
        outputs = [transform(*_scene()) for _ in range(3)]
        return torch.stack([o[0] for o in outputs]), torch.stack([o[1]["semantic"] for o in outputs])

    first, again, other = run(1), run(1), run(2)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], other[0])


def test_transforms_compose_from_yaml_as_a_v2_list():
    cfg = OmegaConf.create({
        "_target_": "torchvision.transforms.v2.Compose",
        "transforms": [
            {"_target_": "segtrain.data.transforms.presets.RandomCrop", "size": [24, 30],
             "cat_max_ratio": 0.75},
            {"_target_": "torchvision.transforms.v2.RandomHorizontalFlip", "p": 1.0},
            {"_target_": "segtrain.data.transforms.presets.PadToMultiple", "size_divisor": 32},
        ],
    })
    transform = instantiate(cfg)
    image, target = transform(*_scene())
    assert image.shape == (3, 32, 32)
    _assert_follows(image, target)


def test_invalid_arguments_name_the_offending_value():
    with pytest.raises(ValueError, match="scale_range"):
        semantic_train_transforms(scale=(2048, 512))
    with pytest.raises(ValueError, match="cat_max_ratio"):
        RandomCrop(8, cat_max_ratio=0.0)
    with pytest.raises(ValueError, match="ratio_range"):
        RandomResize((2048, 512), (2.0, 0.5))
    with pytest.raises(ValueError, match="size_divisor"):
        PadToMultiple(0)


RECIPES = {  # MMSeg's: RandomResize scale, crop (H, W)
    "voc": ((2048, 512), (512, 512)),
    "voc_aug": ((2048, 512), (512, 512)),
    "ade20k": ((2048, 512), (512, 512)),
    "cityscapes": ((2048, 1024), (512, 1024)),
}


@pytest.mark.parametrize("name", RECIPES)
def test_dataset_presets_use_the_mmseg_recipe(compose_cfg, name):
    cfg = compose_cfg("train", [f"dataset={name}"])
    steps = instantiate(cfg.dataset.train.transforms).transforms
    names = [type(s).__name__ for s in steps]
    assert names == ["ResizeCrop", "RandomHorizontalFlip", "PhotoMetricDistortion"]
    resize, crop = steps[0].resize, steps[0].crop
    assert type(resize) is RandomResize and type(crop) is RandomCrop
    assert (resize.scale, resize.ratio_range) == (RECIPES[name][0], (0.5, 2.0))
    assert crop.size == RECIPES[name][1] and crop.cat_max_ratio == 0.75 and crop.ignore_index == 255


@pytest.mark.parametrize("name", ["coco_panoptic", "cityscapes_panoptic", "synthetic_panoptic"])
def test_panoptic_presets_use_the_panoptic_pipeline(compose_cfg, name):
    cfg = compose_cfg("train", [f"dataset={name}"])
    assert cfg.dataset.train.transforms._target_.endswith("panoptic_train_transforms")


@pytest.mark.parametrize(
    ("alpha", "beta"), [(1.0, 17.3), (1.0, -31.9), (0.5, 0.0), (1.4999, 0.0), (1.0, 0.0)]
)
def test_photometric_affine_lookup_equals_the_float_expression(alpha, beta):
    image = torch.arange(256, dtype=torch.uint8).repeat(3, 2, 1)  # every value, (3, 2, 256)
    expected = (image.float() * alpha + beta).clamp(0, 255).to(torch.uint8)
    assert torch.equal(_affine(image, alpha, beta), expected)
    assert torch.equal(_affine(image.transpose(1, 2), alpha, beta), expected.transpose(1, 2))
