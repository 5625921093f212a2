"""The synthetic shapes dataset, its metadata, the semantic transforms and the PNG export."""

from __future__ import annotations

import io
import json

import pytest
import torch
from PIL import Image
from torch.nn import functional as nnf
from torch.utils.data import DataLoader
from torchvision import tv_tensors

from segtrain.data.codecs.image_io import read_image, read_label
from segtrain.data.datasets.synthetic import SHAPES, SyntheticDataset
from segtrain.data.export.semantic import export_semantic
from segtrain.data.meta import DatasetMeta, default_palette
from segtrain.data.transforms.presets import semantic_eval_transforms, semantic_train_transforms


def _equal_samples(a, b) -> bool:
    (image_a, target_a), (image_b, target_b) = a, b
    if not torch.equal(image_a, image_b) or target_a.keys() != target_b.keys():
        return False
    return all(
        torch.equal(torch.as_tensor(target_a[k]), torch.as_tensor(target_b[k])) for k in target_a
    )


def _owner(masks: torch.Tensor) -> torch.Tensor:
    """(H, W) int64: 1 + index of the instance covering each pixel, 0 for background."""
    ids = torch.arange(1, len(masks) + 1).view(-1, 1, 1)
    return (masks.long() * ids).sum(0)


# ------------------------------------------------------------------------------ determinism
def test_item_is_identical_on_repeat_and_in_a_new_instance():
    ds = SyntheticDataset(num_samples=8, image_size=64)
    first = [ds[i] for i in (5, 2)]
    assert _equal_samples(ds[5], first[0])
    fresh = SyntheticDataset(num_samples=8, image_size=64)
    assert _equal_samples(fresh[2], first[1])
    assert not torch.equal(ds[5][0], ds[2][0])


def test_splits_and_seeds_give_different_samples():
    train = SyntheticDataset("train", 4, image_size=64)
    val = SyntheticDataset("val", 4, image_size=64)
    other_seed = SyntheticDataset("train", 4, image_size=64, seed=1)
    for i in range(4):
        assert not torch.equal(train[i][0], val[i][0])
        assert not torch.equal(train[i][0], other_seed[i][0])


def test_loader_workers_yield_the_samples_of_direct_access():
    ds = SyntheticDataset(num_samples=6, image_size=32)
    loader = DataLoader(ds, batch_size=None, num_workers=2, shuffle=False)
    for index, sample in enumerate(loader):
        assert _equal_samples(sample, ds[index])


# ------------------------------------------------------------------------------ contents
@pytest.mark.parametrize(
    ("image_size", "num_classes"), [(64, 6), ((48, 80), 2), ((80, 48), 10)]
)
def test_item_types_shapes_and_value_ranges(image_size, num_classes):
    ds = SyntheticDataset(num_samples=4, image_size=image_size, num_classes=num_classes)
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    for index in range(len(ds)):
        image, target = ds[index]
        assert isinstance(image, tv_tensors.Image)
        assert image.dtype == torch.uint8 and image.shape == (3, h, w)
        semantic, masks = target["semantic"], target["masks"]
        assert isinstance(semantic, tv_tensors.Mask) and semantic.dtype == torch.int64
        assert semantic.shape == (h, w)
        assert int(semantic.min()) >= 0 and int(semantic.max()) < num_classes
        n = len(target["labels"])
        assert isinstance(masks, tv_tensors.Mask) and masks.dtype == torch.bool
        assert masks.shape == (n, h, w)
        assert target["labels"].dtype == torch.int64
        assert all(1 <= int(label) < num_classes for label in target["labels"])
        boxes = target["boxes"]
        assert isinstance(boxes, tv_tensors.BoundingBoxes) and boxes.shape == (n, 4)
        assert boxes.format == tv_tensors.BoundingBoxFormat.XYXY
        assert tuple(boxes.canvas_size) == (h, w)
        assert torch.equal(target["iscrowd"], torch.zeros(n, dtype=torch.int64))
        assert target["image_id"] == index
        assert target["orig_size"].tolist() == [h, w]
    assert len(ds) == 4


def test_instance_masks_are_disjoint_nonempty_and_agree_with_semantic():
    ds = SyntheticDataset(num_samples=16, image_size=64, max_shapes=6)
    counts = []
    for index in range(len(ds)):
        _, target = ds[index]
        masks, labels, semantic = target["masks"], target["labels"], target["semantic"]
        counts.append(len(masks))
        assert int(masks.sum(0).max()) <= 1  # visible parts never overlap
        assert bool(masks.flatten(1).any(1).all())  # fully hidden shapes are dropped
        expected = torch.cat([torch.zeros(1, dtype=torch.int64), labels])[_owner(masks)]
        assert torch.equal(semantic, expected)
    assert max(counts) > 1 and min(counts) >= 1


def test_a_later_shape_occludes_an_earlier_one():
    ds = SyntheticDataset(num_samples=1, image_size=64)
    image = torch.zeros(3, 64, 64)
    owner = torch.zeros(64, 64, dtype=torch.int64)
    params = [0.0, 0.0, 0.5, 0.5, 0.0, 0.0, 0.5, 0.5, 0.5]  # no rotation, no shading
    red, blue = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 0.0, 1.0])
    ds._draw_shape(image, owner, 1, 1, (32.0, 24.0), 12.0, params, red)  # circle
    ds._draw_shape(image, owner, 2, 1, (32.0, 40.0), 12.0, params, blue)  # circle, right
    # Column 32 lies in both discs: the second one wins, in the image and in the masks.
    assert owner[32, 32] == 2 and owner[32, 20] == 1 and owner[32, 50] == 2
    assert image[:, 32, 32].tolist() == [0.0, 0.0, 1.0]
    assert image[:, 32, 20].tolist() == [1.0, 0.0, 0.0]
    target = ds._target(owner, torch.tensor([1, 1]), 0)
    assert not target["masks"][0, 32, 32] and target["masks"][1, 32, 32]


def test_boxes_are_the_tight_bounds_of_the_masks_with_exclusive_ends():
    ds = SyntheticDataset(num_samples=6, image_size=(48, 64))
    for index in range(len(ds)):
        _, target = ds[index]
        for mask, box in zip(target["masks"], target["boxes"]):
            ys, xs = torch.nonzero(mask, as_tuple=True)
            expected = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
            assert box.tolist() == [float(v) for v in expected]


def _reference_outline_band(masks: torch.Tensor, k: int) -> torch.Tensor:
    """Union over instances of dilation minus erosion by a (2k+1)^2 square, by explicit shifts.

    Outside the canvas counts as 'same as the pixel' (the canvas edge is not an outline).
    """
    n, h, w = masks.shape
    band = torch.zeros(h, w, dtype=torch.bool)
    for mask in masks:
        grown = nnf.pad(mask[None].float(), (k, k, k, k), value=0.0)[0].bool()
        shrunk = nnf.pad(mask[None].float(), (k, k, k, k), value=1.0)[0].bool()
        dilated = torch.zeros(h, w, dtype=torch.bool)
        eroded = torch.ones(h, w, dtype=torch.bool)
        for dy in range(2 * k + 1):
            for dx in range(2 * k + 1):
                dilated |= grown[dy : dy + h, dx : dx + w]
                eroded &= shrunk[dy : dy + h, dx : dx + w]
        band |= dilated & ~eroded
    return band


@pytest.mark.parametrize("k", [1, 3])
def test_void_border_marks_exactly_the_pixels_near_visible_outlines(k):
    plain = SyntheticDataset(num_samples=4, image_size=64)
    void = SyntheticDataset(num_samples=4, image_size=64, void_border=k)
    for index in range(4):
        image, target = void[index]
        image0, target0 = plain[index]
        assert torch.equal(image, image0) and torch.equal(target["masks"], target0["masks"])
        band = _reference_outline_band(target["masks"], k)
        assert band.any()
        assert torch.equal(target["semantic"] == 255, band)
        assert torch.equal(target["semantic"][~band], target0["semantic"][~band])


def test_colour_separates_hue_families_but_not_the_two_kinds_of_a_pair():
    ds = SyntheticDataset(num_samples=64, image_size=64)
    colours, labels = [], []
    for index in range(len(ds)):
        image, target = ds[index]
        for mask, label in zip(target["masks"], target["labels"]):
            colours.append(image[:, mask].float().mean(1))
            labels.append(int(label))
    colours, labels = torch.stack(colours), torch.tensor(labels)
    kinds = range(1, ds.num_classes)
    means = torch.stack([colours[labels == k].mean(0) for k in kinds])
    predicted = torch.cdist(colours, means).argmin(1) + 1
    accuracy = {k: float((predicted[labels == k] == k).float().mean()) for k in kinds}
    # circle/rectangle and ring/cross share a hue family; the triangle has one to itself.
    assert accuracy[SHAPES.index("triangle") + 1] == 1.0
    for name in ("circle", "rectangle", "ring", "cross"):
        assert accuracy[SHAPES.index(name) + 1] < 0.9, name
    family = {SHAPES.index(n) + 1: f for n, f in [("circle", 0), ("rectangle", 0), ("ring", 1),
                                                   ("cross", 1), ("triangle", 2)]}
    assert all(family[int(p)] == family[int(t)] for p, t in zip(predicted, labels))


def test_meta_lists_background_then_shape_kinds():
    meta = SyntheticDataset(num_samples=1, num_classes=4).meta
    assert meta.classes == ["background", "circle", "rectangle", "ring"]
    assert meta.stuff_ids == [0] and meta.thing_ids == [1, 2, 3]
    assert meta.palette == default_palette(4) and meta.ignore_index == 255


@pytest.mark.parametrize(
    "kwargs",
    [{"num_classes": 1}, {"num_classes": len(SHAPES) + 2}, {"image_size": 8}, {"max_shapes": 0},
     {"num_classes": 3, "kind_weights": [1.0]}, {"num_classes": 3, "kind_weights": [1.0, -1.0]},
     {"num_classes": 3, "kind_weights": [0.0, 0.0]},
     {"num_classes": 3, "stuff_classes": 1, "kind_weights": [1.0, 1.0]}],
)
def test_invalid_arguments_raise_value_error(kwargs):
    with pytest.raises(ValueError, match="expected"):
        SyntheticDataset(**kwargs)


def test_kind_weights_draw_kinds_by_frequency_and_none_changes_nothing():
    plain = SyntheticDataset(num_samples=60, image_size=32, num_classes=4)
    uniform = SyntheticDataset(num_samples=60, image_size=32, num_classes=4, kind_weights=None)
    rare = SyntheticDataset(num_samples=60, image_size=32, num_classes=4, kind_weights=[1, 1, 0.1])
    absent = SyntheticDataset(num_samples=60, image_size=32, num_classes=4, kind_weights=[1, 0, 1])
    for i in range(3):
        assert torch.equal(plain[i][0], uniform[i][0])
    counts = {name: torch.zeros(4) for name in ("plain", "rare")}
    for name, ds in (("plain", plain), ("rare", rare)):
        for i in range(len(ds)):
            counts[name] += torch.bincount(ds[i][1]["labels"], minlength=4).float()
    assert counts["rare"][3] < 0.3 * counts["plain"][3]  # drawn ~10x less often
    assert counts["rare"][3] > 0  # but drawn
    assert all(2 not in absent[i][1]["labels"].tolist() for i in range(len(absent)))


def test_index_out_of_range_raises_index_error():
    ds = SyntheticDataset(num_samples=3, image_size=32)
    with pytest.raises(IndexError, match="3"):
        ds[3]
    assert len(list(iter(ds))) == 3  # the sequence protocol stops on IndexError


# ------------------------------------------------------------------------------ transforms
def test_dataset_applies_transforms_jointly_hflip_equals_torch_flip():
    plain = SyntheticDataset(num_samples=2, image_size=(40, 64))
    flipped = SyntheticDataset(
        num_samples=2, image_size=(40, 64), transforms=semantic_train_transforms(hflip_prob=1.0)
    )
    image0, target0 = plain[1]
    image, target = flipped[1]
    assert torch.equal(image, torch.flip(image0, [-1]))
    assert torch.equal(target["semantic"], torch.flip(target0["semantic"], [-1]))
    assert torch.equal(target["masks"], torch.flip(target0["masks"], [-1]))
    x1, y1, x2, y2 = target0["boxes"].unbind(1)
    assert torch.equal(target["boxes"], torch.stack([64 - x2, y1, 64 - x1, y2], 1))
    assert torch.equal(target["labels"], target0["labels"])
    assert target["orig_size"].tolist() == [40, 64] and target["image_id"] == 1


def test_padding_fills_image_with_zero_labels_with_ignore_and_instance_masks_with_false():
    image0, target0 = SyntheticDataset(num_samples=1, image_size=32)[0]
    transform = semantic_train_transforms(hflip_prob=0.0, crop_size=(40, 36), ignore_index=250)
    image, target = transform(image0, target0)
    assert image.shape == (3, 40, 36) and target["semantic"].shape == (40, 36)
    assert torch.equal(image[:, :32, :32], image0)
    assert torch.equal(target["semantic"][:32, :32], target0["semantic"])
    assert bool((image[:, 32:] == 0).all()) and bool((image[:, :, 32:] == 0).all())
    assert bool((target["semantic"][32:] == 250).all())
    assert bool((target["semantic"][:, 32:] == 250).all())
    assert target["masks"].dtype == torch.bool and not target["masks"][:, 32:].any()
    assert torch.equal(target["masks"][:, :32, :32], target0["masks"])
    assert torch.equal(target["boxes"], target0["boxes"])
    assert tuple(target["boxes"].canvas_size) == (40, 36)


def test_random_crop_cuts_image_and_labels_at_the_same_offset():
    torch.manual_seed(0)
    image0, target0 = SyntheticDataset(num_samples=1, image_size=64)[0]
    transform = semantic_train_transforms(hflip_prob=0.0, crop_size=24)
    offsets = set()
    for _ in range(5):
        image, target = transform(image0, target0)
        matches = [
            (y, x) for y in range(41) for x in range(41)
            if torch.equal(image0[:, y : y + 24, x : x + 24], image)
        ]
        assert len(matches) == 1
        y, x = matches[0]
        offsets.add((y, x))
        assert torch.equal(target["semantic"], target0["semantic"][y : y + 24, x : x + 24])
        assert torch.equal(target["masks"], target0["masks"][:, y : y + 24, x : x + 24])
    assert len(offsets) > 1


def test_random_scale_resizes_labels_with_nearest_neighbour():
    image0, target0 = SyntheticDataset(num_samples=1, image_size=64)[0]
    transform = semantic_train_transforms(hflip_prob=0.0, scale_range=(0.5, 0.5))
    image, target = transform(image0, target0)
    assert image.shape == (3, 32, 32) and image.dtype == torch.uint8
    assert torch.equal(target["semantic"], target0["semantic"][::2, ::2])
    assert torch.equal(target["masks"], target0["masks"][:, ::2, ::2])
    assert torch.allclose(target["boxes"], target0["boxes"] / 2)


def test_invalid_transform_arguments_raise_value_error():
    with pytest.raises(ValueError, match="scale_range"):
        semantic_train_transforms(scale_range=(2.0, 1.0))
    with pytest.raises(ValueError, match="crop_size"):
        semantic_train_transforms(crop_size=0)
    with pytest.raises(ValueError, match="hflip_prob"):
        semantic_train_transforms(hflip_prob=1.5)


def test_eval_transforms_change_nothing():
    assert semantic_eval_transforms() is None


# ------------------------------------------------------------------------------ metadata
def test_default_palette_starts_with_voc_colours_and_never_repeats():
    palette = default_palette(256)
    assert palette[:5] == [(0, 0, 0), (128, 0, 0), (0, 128, 0), (128, 128, 0), (0, 0, 128)]
    assert palette[15] == (192, 128, 128)  # VOC 'person'
    assert len(set(palette)) == 256
    assert default_palette(7) == palette[:7]


def test_meta_round_trips_through_json_and_weights_only_torch_load():
    meta = DatasetMeta(
        classes=["bg", "car", "road"], palette=[(0, 0, 0), (1, 2, 3), (4, 5, 6)],
        ignore_index=255, thing_ids=[1], stuff_ids=[0, 2], category_ids=[0, 3, 7],
    )
    assert DatasetMeta.from_dict(json.loads(json.dumps(meta.to_dict()))) == meta
    buffer = io.BytesIO()
    torch.save({"meta": meta.to_dict()}, buffer)
    buffer.seek(0)
    assert DatasetMeta.from_dict(torch.load(buffer, weights_only=True)["meta"]) == meta
    assert meta.num_classes == 3
    assert meta.category_id(1) == 3 and meta.contiguous_id(7) == 2
    identity = DatasetMeta(classes=["a", "b"], palette=default_palette(2))
    assert identity.category_id(1) == 1 and identity.contiguous_id(0) == 0


def test_meta_rejects_inconsistent_fields():
    with pytest.raises(ValueError, match="palette"):
        DatasetMeta(classes=["a", "b"], palette=[(0, 0, 0)])
    with pytest.raises(ValueError, match="thing_ids"):
        DatasetMeta(classes=["a"], palette=[(0, 0, 0)], thing_ids=[1])
    with pytest.raises(ValueError, match="category_ids"):
        DatasetMeta(classes=["a", "b"], palette=default_palette(2), category_ids=[5])
    with pytest.raises(KeyError, match="9"):
        DatasetMeta(classes=["a"], palette=[(0, 0, 0)], category_ids=[4]).contiguous_id(9)


# ------------------------------------------------------------------------------ export
def test_export_writes_image_and_palette_label_pngs_matching_the_samples(tmp_path):
    ds = SyntheticDataset("val", num_samples=3, image_size=(32, 48), void_border=1)
    stems = export_semantic(ds, tmp_path / "out")
    assert stems == ["000000", "000001", "000002"]
    for index, stem in enumerate(stems):
        image, target = ds[index]
        assert torch.equal(read_image(tmp_path / "out" / "images" / f"{stem}.png"), image)
        label_path = tmp_path / "out" / "labels" / f"{stem}.png"
        assert torch.equal(read_label(label_path), target["semantic"])
        pil = Image.open(label_path)
        assert pil.mode == "P"
        colours = pil.getpalette()
        assert colours[3:6] == list(ds.meta.palette[1]) and colours[765:768] == [224, 224, 192]
    assert sorted(p.name for p in (tmp_path / "out" / "labels").iterdir()) == [
        f"{s}.png" for s in stems
    ]
