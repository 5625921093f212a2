"""`ResizeCrop` (resize only the window a crop keeps) against resizing the whole frame, then cropping:
same draws, maps and boxes exactly, images exactly when shrinking and within 1 grey level when
growing."""

from __future__ import annotations

import pytest
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from segtrain.data.datasets.panoptic import masks_to_boxes
from segtrain.data.transforms.presets import (
    PanopticMap,
    RandomCrop,
    RandomResize,
    RandomScale,
    ResizeCrop,
    semantic_train_transforms,
)
from segtrain.data.transforms.window_resize import nearest_indices, resize_window

# Growing, the float window differs from torch's fixed-point uint8 kernel by 1 on a few pixels.
GROW_TOLERANCE, GROW_MAX_SHARE_OFF = 1, 0.03


def _noisy_scene(height: int, width: int, seed: int = 0) -> tuple[tv_tensors.Image, dict]:
    """Noise images (every sub-pixel shift shows) with blocky uint8 labels, panoptic ids, instance
    masks and boxes."""
    g = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 256, (3, height, width), generator=g, dtype=torch.uint8)
    block = torch.randint(0, 6, (height // 3 + 1, width // 3 + 1), generator=g)
    block = block.repeat_interleave(3, 0).repeat_interleave(3, 1)[:height, :width]
    semantic = torch.where(block == 5, 255, block).to(torch.uint8)
    panoptic = block * 1000 + torch.arange(width) // 7
    masks = torch.stack([block == k for k in range(4)])
    target = {
        "semantic": tv_tensors.Mask(semantic),
        "panoptic": PanopticMap(panoptic),
        "masks": tv_tensors.Mask(masks),
        "boxes": tv_tensors.BoundingBoxes(masks_to_boxes(masks), format="XYXY", canvas_size=(height, width)),
        "labels": torch.arange(1, 5),
    }
    return tv_tensors.Image(image), target


def _both(resize: v2.Transform, crop: RandomCrop, flip: float, scene, seed: int):
    """(fused output, resize-then-crop output) under the same seed."""
    outputs = []
    for steps in ([ResizeCrop(resize, crop)], [resize, crop]):
        torch.manual_seed(seed)
        outputs.append(v2.Compose([*steps, v2.RandomHorizontalFlip(flip)])(*scene))
    return outputs


def _assert_same(fused, reference, exact_image: bool) -> None:
    (image, target), (ref_image, ref_target) = fused, reference
    assert type(image) is tv_tensors.Image and image.dtype == torch.uint8 and image.shape == ref_image.shape
    for key in ("semantic", "panoptic", "masks"):
        assert type(target[key]) is type(ref_target[key]) and target[key].dtype == ref_target[key].dtype
        assert torch.equal(target[key], ref_target[key]), key
    assert torch.equal(target["boxes"], ref_target["boxes"])
    assert tuple(target["boxes"].canvas_size) == tuple(ref_target["boxes"].canvas_size)
    off = (image.int() - ref_image.int()).abs()
    if exact_image:
        assert torch.equal(image, ref_image)
    else:
        assert int(off.max()) <= GROW_TOLERANCE
        assert float((off > 0).float().mean()) <= GROW_MAX_SHARE_OFF


@pytest.mark.parametrize(
    ("size", "factor", "crop"),
    [
        ((64, 96), 2.0, (32, 48)),  # Cityscapes' ratio 2.0 in miniature
        ((37, 53), 1.73, (20, 31)),  # odd sizes, a non-integer factor
        ((41, 29), 1.0, (17, 13)),  # same size: a plain crop
        ((64, 96), 0.5, (20, 30)),  # shrinking: the whole frame is resized
        ((37, 53), 0.77, (25, 19)),
        ((30, 40), 1.4, (50, 70)),  # the crop is larger than the resized frame: pads
        ((30, 40), 0.6, (25, 23)),  # larger on one side only
    ],
)
@pytest.mark.parametrize("flip", [0.0, 1.0])
def test_resize_crop_equals_resizing_the_whole_frame_then_cropping(size, factor, crop, flip):
    for seed in range(3):
        scene = _noisy_scene(*size, seed)
        fused, reference = _both(RandomScale((factor, factor)), RandomCrop(crop), flip, scene, seed)
        _assert_same(fused, reference, exact_image=factor <= 1.0)


def test_resize_crop_pads_image_zero_semantic_ignore_panoptic_void():
    (image, target), _ = _both(RandomScale((1.4, 1.4)), RandomCrop((50, 70)), 0.0, _noisy_scene(30, 40), 0)
    assert image.shape == (3, 50, 70)  # the resized frame is 42 x 56
    assert bool((image[:, 42:] == 0).all()) and bool((image[:, :, 56:] == 0).all())
    assert bool((target["semantic"][42:] == 255).all()) and bool((target["semantic"][:, 56:] == 255).all())
    assert bool((target["panoptic"][42:] == 0).all()) and not target["masks"][:, :, 56:].any()


def test_resize_crop_redraws_like_resize_then_crop_with_cat_max_ratio():
    # Mostly one class: most windows are rejected, so the retries (and their draws) must agree.
    image, target = _noisy_scene(48, 64)
    semantic = torch.zeros(48, 64, dtype=torch.uint8)
    semantic[40:, 50:] = 3
    target["semantic"] = tv_tensors.Mask(semantic)
    for seed in range(10):
        resize = RandomResize((64, 48), (1.0, 2.5))
        fused, reference = _both(resize, RandomCrop((24, 32), cat_max_ratio=0.75), 0.5, (image, target), seed)
        _assert_same(fused, reference, exact_image=False)


def test_semantic_presets_fuse_resize_and_crop_and_keep_the_flip_and_int64_labels():
    steps = semantic_train_transforms(scale=(2048, 512), scale_range=(0.5, 2.0), crop_size=64).transforms
    assert [type(s).__name__ for s in steps] == ["ResizeCrop", "RandomHorizontalFlip"]
    image, target = _noisy_scene(40, 60)
    target["semantic"] = tv_tensors.Mask(target["semantic"].to(torch.int64))
    _, out = v2.Compose(steps)(image, target)
    assert out["semantic"].dtype == torch.int64 and out["semantic"].shape == (64, 64)


@pytest.mark.parametrize(
    ("in_size", "out_size"), [(1024, 2048), (1024, 1537), (37, 80), (53, 29), (7, 7), (5, 1)]
)
def test_nearest_indices_are_the_rows_a_mask_resize_takes(in_size, out_size):
    ramp = tv_tensors.Mask(torch.arange(in_size).view(in_size, 1).expand(in_size, 3))
    assert torch.equal(nearest_indices(in_size, out_size), F.resize(ramp, [out_size, 3])[:, 0])


@pytest.mark.parametrize(
    ("size", "out"), [((128, 256), (256, 512)), ((97, 131), (150, 301)), ((40, 30), (41, 30))]
)
def test_resize_window_of_a_noise_image_is_within_one_grey_level_of_the_full_resize(size, out):
    image = torch.randint(0, 256, (3, *size), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    full = F.resize(image, list(out), antialias=True)
    windows = [(0, 0, 30, 29), (out[0] - 25, out[1] - 17, 25, 17), (7, 3, out[0] - 7, 20)]
    for top, left, height, width in windows:
        window = resize_window(image, list(out), top, left, height, width)
        off = (window.int() - full[:, top : top + height, left : left + width].int()).abs()
        assert int(off.max()) <= GROW_TOLERANCE and float((off > 0).float().mean()) <= GROW_MAX_SHARE_OFF


def test_resize_window_reads_channels_last_images_like_contiguous_ones():
    # torchvision's PNG decoder hands over (3, H, W) views of HWC memory.
    image = torch.randint(0, 256, (3, 40, 50), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    channels_last = image.permute(1, 2, 0).contiguous().permute(2, 0, 1)
    for size in ([60, 75], [30, 37]):
        window = resize_window(channels_last, size, 3, 4, 20, 25)
        assert torch.equal(window, resize_window(image, size, 3, 4, 20, 25))
