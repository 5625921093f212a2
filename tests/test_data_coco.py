"""COCO / LVIS / custom COCO-format instance datasets and the synthetic -> COCO writer."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from PIL import Image
from pycocotools import mask as mask_utils
from torchvision import tv_tensors

from segtrain.data.codecs.coco_masks import decode_masks
from segtrain.data.codecs.image_io import CorruptImageError
from segtrain.data.datasets.coco import COCOInstanceDataset, LVISInstanceDataset
from segtrain.data.datasets.synthetic import SyntheticDataset
from segtrain.data.export.coco import write_coco_instances
from segtrain.data.meta import DatasetMeta, default_palette
from segtrain.data.transforms.presets import instance_train_transforms

H, W = 8, 10


def _rect(x0: int, y0: int, x1: int, y1: int) -> list[float]:
    """Polygon along pixel edges: covers columns x0..x1-1 and rows y0..y1-1."""
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def _box_mask(x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    mask = np.zeros((H, W), dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


def _ann(ann_id: int, image_id: int, category_id: int, segmentation, bbox, iscrowd: int = 0) -> dict:
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "iscrowd": iscrowd,
            "segmentation": segmentation, "bbox": bbox, "area": 1.0}


def _write_coco(root: Path, images: list[dict], anns: list[dict], categories: list[dict],
                split: str = "val") -> Path:
    """A COCO root with `images` (ids; file names made up) as tiny PNGs and the JSON."""
    (root / f"{split}2017").mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for image in images:
        image.setdefault("file_name", f"{image['id']:012d}.png")
        image.setdefault("height", H)
        image.setdefault("width", W)
        pixels = np.full((image["height"], image["width"], 3), image["id"] % 256, dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"{split}2017" / image["file_name"])
    ann_file = root / "annotations" / f"instances_{split}2017.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": anns, "categories": categories}))
    return ann_file


CATS = [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]


def test_writer_round_trip_reproduces_the_synthetic_items(tmp_path):
    synthetic = SyntheticDataset(split="val", num_samples=4, image_size=(40, 56), num_classes=5)
    ann_file = write_coco_instances(synthetic, tmp_path, split="val")
    assert ann_file == tmp_path / "annotations" / "instances_val2017.json"
    coco = COCOInstanceDataset(tmp_path, split="val")
    assert len(coco) == 4 and coco.gt_json == ann_file
    assert coco.meta.classes == synthetic.meta.classes
    for index in range(4):
        image, target = synthetic[index]
        read_image, read_target = coco[index]
        assert isinstance(read_image, tv_tensors.Image) and torch.equal(read_image, image)
        assert isinstance(read_target["boxes"], tv_tensors.BoundingBoxes)
        assert isinstance(read_target["masks"], tv_tensors.Mask)
        for key in ("masks", "labels", "boxes", "iscrowd", "orig_size"):
            assert read_target[key].dtype == target[key].dtype, key
            assert torch.equal(read_target[key], target[key]), key
        assert read_target["image_id"] == target["image_id"]
    data = json.loads(ann_file.read_text())
    assert min(a["id"] for a in data["annotations"]) == 1
    assert all(isinstance(a["segmentation"]["counts"], str) for a in data["annotations"])


class _TwoImages(torch.utils.data.Dataset):
    """Instance targets with a crowd region, under non-contiguous category ids."""

    meta = DatasetMeta(["background", "person", "car", "toothbrush"], default_palette(4),
                       thing_ids=[1, 2, 3], stuff_ids=[0], category_ids=[0, 1, 3, 90])

    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int):
        masks = torch.from_numpy(np.stack([_box_mask(1, 1, 4, 5), _box_mask(5, 0, 10, 8)][: 2 - index]))
        boxes = [[1, 1, 4, 5], [5, 0, 10, 8]][: 2 - index]
        target = {"masks": tv_tensors.Mask(masks), "labels": torch.tensor([3, 2][: 2 - index]),
                  "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(H, W)),
                  "iscrowd": torch.tensor([0, 1][: 2 - index]), "image_id": 40 + index}
        return tv_tensors.Image(torch.full((3, H, W), index, dtype=torch.uint8)), target


def test_writer_keeps_dataset_category_ids_and_crowd_regions(tmp_path):
    source = _TwoImages()
    ann_file = write_coco_instances(source, tmp_path, split="train")
    data = json.loads(ann_file.read_text())
    assert [c["id"] for c in data["categories"]] == [1, 3, 90]
    assert [(a["category_id"], a["iscrowd"], a["area"]) for a in data["annotations"]] == [
        (90, 0, 12.0), (3, 1, 40.0), (90, 0, 12.0)]
    assert data["annotations"][1]["bbox"] == [5, 0, 5, 8]
    dataset = COCOInstanceDataset(tmp_path, split="train", train=False)
    assert dataset.meta.category_ids == source.meta.category_ids
    for index in range(2):
        _, expected = source[index]
        _, target = dataset[index]
        for key in ("masks", "labels", "iscrowd"):
            assert torch.equal(target[key], expected[key]), key
        assert target["boxes"].tolist() == expected["boxes"].tolist()
    assert len(COCOInstanceDataset(tmp_path, split="train")[0][1]["labels"]) == 1  # crowd left out


def test_an_image_whose_size_differs_from_the_json_is_an_error(tmp_path):
    _write_coco(tmp_path, [{"id": 1, "height": 6}], [], CATS)
    Image.fromarray(np.zeros((H, W, 3), dtype=np.uint8)).save(tmp_path / "val2017" / "000000000001.png")
    with pytest.raises(ValueError, match=r"000000000001.png is \(8, 10\) \(H, W\) but .* says \(6, 10\)"):
        COCOInstanceDataset(tmp_path, split="val")[0]


def test_polygon_uncompressed_and_compressed_rle_decode_to_the_expected_masks(tmp_path):
    l_shape = _box_mask(0, 5, 2, 8) | _box_mask(0, 7, 5, 8)
    compressed = mask_utils.encode(np.asfortranarray(l_shape.astype(np.uint8)))
    # Column-major runs, starting with zeros: pixels (x=7..8, y=5..6) of an 8 x 10 image.
    uncompressed = {"size": [H, W], "counts": [61, 2, 6, 2, 9]}
    anns = [
        _ann(1, 1, 1, [_rect(2, 1, 6, 5)], [2, 1, 4, 4]),
        _ann(2, 1, 2, [_rect(0, 0, 2, 2), _rect(8, 0, 10, 2)], [0, 0, 10, 2]),  # two parts: union
        _ann(3, 1, 1, uncompressed, [7, 5, 2, 2]),
        _ann(4, 1, 2, {"size": [H, W], "counts": compressed["counts"].decode()}, [0, 5, 5, 3]),
    ]
    _write_coco(tmp_path, [{"id": 1}], anns, CATS)
    _, target = COCOInstanceDataset(tmp_path, split="val")[0]
    expected = [
        _box_mask(2, 1, 6, 5),
        _box_mask(0, 0, 2, 2) | _box_mask(8, 0, 10, 2),
        _box_mask(7, 5, 9, 7),
        l_shape,
    ]
    assert target["masks"].dtype == torch.bool and target["masks"].shape == (4, H, W)
    assert torch.equal(target["masks"], torch.from_numpy(np.stack(expected)))
    assert target["labels"].tolist() == [1, 2, 1, 2]
    assert target["boxes"].tolist() == [[2, 1, 6, 5], [0, 0, 10, 2], [7, 5, 9, 7], [0, 5, 5, 8]]


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's crowd format: column-major run lengths as a list, starting with background."""
    flat = mask.ravel(order="F").astype(np.int64)
    changes = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate(([0], changes, [flat.size]))
    runs = np.diff(bounds).tolist()
    return {"size": list(mask.shape), "counts": [0, *runs] if flat[0] else runs}


def _random_segmentations(rng: np.random.Generator, height: int, width: int) -> list:
    """Polygons (some in several parts, some reaching outside the image), crowd-style
    uncompressed RLE and compressed RLE (str and bytes) of masks from empty to full."""
    segs = []
    for kind in rng.integers(0, 5, size=int(rng.integers(1, 12))):
        if kind < 2:
            parts = []
            for _ in range(int(rng.integers(1, 4)) if kind == 1 else 1):
                k = int(rng.integers(3, 16))
                xy = np.stack([rng.uniform(-10, width + 10, k), rng.uniform(-10, height + 10, k)], 1)
                parts.append(xy.ravel().round(2).tolist())
            segs.append(parts)
            continue
        mask = rng.random((height, width)) < rng.choice([0.0, 0.02, 0.5, 1.0])
        if rng.random() < 0.5:  # one rectangle: long runs, counts of several 5-bit groups
            mask = np.zeros((height, width), dtype=bool)
            y, x = int(rng.integers(0, height)), int(rng.integers(0, width))
            mask[y : y + int(rng.integers(1, height + 1)), x : x + int(rng.integers(1, width + 1))] = True
        if kind == 2:
            segs.append(_uncompressed_rle(mask))
        else:
            counts = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"]
            segs.append({"size": [height, width], "counts": counts.decode() if kind == 3 else counts})
    return segs


def _pycocotools_masks(segs: list, height: int, width: int) -> torch.Tensor:
    """One pycocotools decode per object, parts united, as torchvision's references do."""
    masks = []
    for seg in segs:
        compressed = isinstance(seg, dict) and not isinstance(seg["counts"], list)
        mask = mask_utils.decode(seg if compressed else mask_utils.frPyObjects(seg, height, width))
        masks.append(mask.any(axis=2) if mask.ndim == 3 else mask.astype(bool))
    return torch.from_numpy(np.stack(masks))


@pytest.mark.parametrize("seed", range(6))
def test_batched_mask_decode_equals_pycocotools_per_object(seed):
    rng = np.random.default_rng(seed)
    for _ in range(20):
        height, width = int(rng.integers(1, 200)), int(rng.integers(1, 200))
        segs = _random_segmentations(rng, height, width)
        masks = decode_masks(segs, height, width)
        assert masks.dtype == torch.bool and masks.shape == (len(segs), height, width)
        assert torch.equal(masks, _pycocotools_masks(segs, height, width))


def test_decoded_masks_keep_pycocotools_column_major_layout():
    masks = decode_masks([[_rect(2, 1, 6, 5)], [_rect(0, 0, 2, 2)]], H, W)
    assert masks.stride() == (H * W, 1, H)  # what RLE encoding reads without a copy
    assert decode_masks([], H, W).shape == (0, H, W)


def test_an_rle_that_does_not_cover_its_image_is_an_error_naming_the_image(tmp_path):
    with pytest.raises(ValueError, match=r"segmentation 1 is an RLE covering 79 pixels; .* 8 \* 10"):
        decode_masks([[_rect(0, 0, 2, 2)], {"size": [H, W], "counts": [70, 9]}], H, W)
    short = {"size": [H, W], "counts": [70, 9]}
    _write_coco(tmp_path, [{"id": 4}], [_ann(1, 4, 1, short, [0, 0, 2, 2], iscrowd=1)], CATS)
    with pytest.raises(ValueError, match=r"instances_val2017.json: image id 4: segmentation 0 is an RLE"):
        COCOInstanceDataset(tmp_path, split="val")[0]


def _crowd_root(root: Path) -> None:
    crowd = {"size": [H, W], "counts": [0, 16, 64]}  # the first two columns
    anns = [
        _ann(1, 1, 1, [_rect(2, 1, 6, 5)], [2, 1, 4, 4]),
        _ann(2, 1, 2, crowd, [0, 0, 2, 8], iscrowd=1),
        _ann(3, 2, 1, crowd, [0, 0, 2, 8], iscrowd=1),  # image 2 holds only a crowd region
    ]
    _write_coco(root, [{"id": 1}, {"id": 2}, {"id": 3}], anns, CATS)  # image 3: no annotation


def test_training_targets_leave_out_crowd_regions_and_images_without_objects(tmp_path):
    _crowd_root(tmp_path)
    dataset = COCOInstanceDataset(tmp_path, split="val", train=True)
    assert dataset.image_ids == [1]
    _, target = dataset[0]
    assert target["iscrowd"].tolist() == [0] and target["labels"].tolist() == [1]


def test_evaluation_keeps_every_image_and_crowd_regions_with_iscrowd(tmp_path):
    _crowd_root(tmp_path)
    dataset = COCOInstanceDataset(tmp_path, split="val")
    assert not dataset.train and dataset.image_ids == [1, 2, 3]
    _, target = dataset[0]
    assert target["iscrowd"].tolist() == [0, 1] and target["labels"].tolist() == [1, 2]
    assert torch.equal(target["masks"][1], torch.from_numpy(_box_mask(0, 0, 2, 8)))
    _, empty = dataset[2]
    assert empty["masks"].shape == (0, H, W) and empty["masks"].dtype == torch.bool
    assert empty["boxes"].shape == (0, 4) and empty["labels"].dtype == torch.int64
    assert empty["image_id"] == 3 and empty["orig_size"].tolist() == [H, W]


def test_filter_empty_can_be_turned_off_for_training(tmp_path):
    _crowd_root(tmp_path)
    dataset = COCOInstanceDataset(tmp_path, split="val", train=True, filter_empty=False)
    assert dataset.image_ids == [1, 2, 3]
    assert dataset[1][1]["masks"].shape == (0, H, W)


def test_degenerate_polygons_and_zero_area_boxes_are_skipped_with_one_warning(tmp_path, caplog):
    anns = [
        _ann(1, 1, 1, [_rect(2, 1, 6, 5)], [2, 1, 4, 4]),
        _ann(2, 1, 1, [[1, 1, 3, 3]], [1, 1, 2, 2]),  # 2 points (pycocotools would read a box)
        _ann(3, 1, 1, [[1, 1, 2, 2, 3, 3]], [1, 1, 2, 2]),  # collinear: zero area
        _ann(4, 1, 2, [_rect(2, 1, 6, 5)], [2, 1, 0, 4]),  # zero-width box
        _ann(5, 1, 2, [[0, 0, 1, 1], _rect(7, 6, 9, 8)], [7, 6, 2, 2]),  # one part survives
        _ann(6, 2, 1, [[0, 0, 0, 0, 0, 0]], [0, 0, 1, 1]),  # image 2 has nothing usable
    ]
    _write_coco(tmp_path, [{"id": 1}, {"id": 2}], anns, CATS)
    with caplog.at_level(logging.WARNING, logger="segtrain.data.datasets.coco"):
        dataset = COCOInstanceDataset(tmp_path, split="val", train=True)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert "3 annotations with degenerate polygons" in message and "1 with zero-area boxes" in message
    assert str(dataset.gt_json) in message
    assert dataset.image_ids == [1]
    _, target = dataset[0]
    assert target["labels"].tolist() == [1, 2]
    assert torch.equal(target["masks"][1], torch.from_numpy(_box_mask(7, 6, 9, 8)))


def test_category_ids_map_to_contiguous_labels_and_back(tmp_path):
    categories = [{"id": 90, "name": "toothbrush"}, {"id": 1, "name": "person"}, {"id": 3, "name": "car"}]
    anns = [_ann(i, 1, cat, [_rect(0, 0, 2, 2)], [0, 0, 2, 2]) for i, cat in enumerate((3, 90, 1), 1)]
    _write_coco(tmp_path, [{"id": 1}], anns, categories)
    dataset = COCOInstanceDataset(tmp_path, split="val", num_classes=4)
    meta = dataset.meta
    assert meta.classes == ["background", "person", "car", "toothbrush"]
    assert meta.category_ids == [0, 1, 3, 90]
    assert [meta.category_id(k) for k in (1, 2, 3)] == [1, 3, 90]
    assert [meta.contiguous_id(i) for i in (1, 3, 90)] == [1, 2, 3]
    assert meta.thing_ids == [1, 2, 3]
    assert dataset[0][1]["labels"].tolist() == [2, 3, 1]


def test_a_category_id_of_zero_moves_the_background_placeholder_below_it(tmp_path):
    _write_coco(tmp_path, [{"id": 1}], [], [{"id": 0, "name": "a"}, {"id": 1, "name": "b"}])
    meta = COCOInstanceDataset(tmp_path, split="val").meta
    assert meta.category_ids == [-1, 0, 1] and meta.contiguous_id(0) == 1


def test_num_classes_that_disagrees_with_the_json_is_an_error(tmp_path):
    _write_coco(tmp_path, [{"id": 1}], [], CATS)
    with pytest.raises(ValueError, match=r"num_classes=81 .* has 2 categories; pass num_classes=3"):
        COCOInstanceDataset(tmp_path, split="val", num_classes=81)


def test_missing_root_annotation_file_or_image_folder_names_the_path(tmp_path):
    with pytest.raises(ValueError, match="root is not set"):
        COCOInstanceDataset(None, split="val")
    missing = tmp_path / "nowhere"
    expected_tree = f"(?s)root {missing} is not a directory.*annotations/instances_val2017.json"
    with pytest.raises(FileNotFoundError, match=expected_tree):
        COCOInstanceDataset(missing, split="val")
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}/annotations/instances_val2017.json not found"):
        COCOInstanceDataset(tmp_path, split="val")
    _write_coco(tmp_path, [{"id": 1}], [], CATS)
    with pytest.raises(FileNotFoundError, match=f"image folder {tmp_path}/elsewhere not found"):
        COCOInstanceDataset(tmp_path, split="val", img_dir="elsewhere")


def test_an_annotation_of_an_unknown_category_is_named(tmp_path):
    _write_coco(tmp_path, [{"id": 1}], [_ann(12, 1, 5, [_rect(0, 0, 2, 2)], [0, 0, 2, 2])], CATS)
    with pytest.raises(KeyError, match=r"annotation 12 has category_id 5, which is not among .*\[1, 2\]"):
        COCOInstanceDataset(tmp_path, split="val")


def test_custom_paths_that_do_not_exist_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}/mine.json not found; expected ann_file=mine"):
        COCOInstanceDataset(tmp_path, ann_file="mine.json", img_dir="images")
    (tmp_path / "mine.json").write_text("{not json")
    with pytest.raises(ValueError, match="mine.json is not valid JSON"):
        COCOInstanceDataset(tmp_path, ann_file="mine.json", img_dir=".")


def test_a_missing_image_file_is_named(tmp_path):
    _write_coco(tmp_path, [{"id": 1}, {"id": 2}], [], CATS)
    second = tmp_path / "val2017" / "000000000002.png"
    second.unlink()
    dataset = COCOInstanceDataset(tmp_path, split="val")
    with pytest.raises(FileNotFoundError, match=f"image file {second} not found \\(image id 2"):
        dataset[1]
    (tmp_path / "val2017" / "000000000001.png").unlink()
    with pytest.raises(FileNotFoundError, match="000000000001.png not found"):  # found at construction
        COCOInstanceDataset(tmp_path, split="val")


def test_a_corrupt_image_file_is_named(tmp_path):
    _write_coco(tmp_path, [{"id": 1}], [], CATS)
    path = tmp_path / "val2017" / "000000000001.png"
    path.write_bytes(path.read_bytes()[:40])  # truncated
    with pytest.raises(CorruptImageError, match=str(path)):
        COCOInstanceDataset(tmp_path, split="val")[0]


def test_an_rle_whose_size_differs_from_its_image_is_an_error(tmp_path):
    anns = [_ann(7, 1, 1, {"size": [W, H], "counts": [80]}, [0, 0, 1, 1])]
    _write_coco(tmp_path, [{"id": 1}], anns, CATS)
    with pytest.raises(ValueError, match=r"annotation 7: segmentation is RLE of size \[10, 8\]; .*\[8, 10\]"):
        COCOInstanceDataset(tmp_path, split="val")


def test_lvis_resolves_images_by_coco_url_and_keeps_category_frequencies(tmp_path):
    categories = [{"id": i, "name": name, "frequency": freq, "synonyms": [name]}
                  for i, name, freq in ((2, "aerosol_can", "c"), (1, "acorn", "r"), (3, "apple", "f"))]
    images = []
    for image_id, folder in ((5, "train2017"), (9, "val2017")):
        (tmp_path / folder).mkdir()
        name = f"{image_id:012d}.jpg"
        Image.fromarray(np.zeros((H, W, 3), dtype=np.uint8)).save(tmp_path / folder / name)
        images.append({"id": image_id, "height": H, "width": W, "neg_category_ids": [1],
                       "not_exhaustive_category_ids": [], "coco_url": f"http://images.cocodataset.org/{folder}/{name}"})
    anns = [{"id": 1, "image_id": 9, "category_id": 3, "segmentation": [_rect(1, 1, 4, 4)],
             "bbox": [1, 1, 3, 3], "area": 9.0}]  # LVIS has no iscrowd
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "lvis_v1_val.json").write_text(
        json.dumps({"images": images, "annotations": anns, "categories": categories}))
    dataset = LVISInstanceDataset(tmp_path, split="val")
    assert dataset.gt_json == tmp_path / "annotations" / "lvis_v1_val.json"
    assert dataset.meta.classes == ["background", "acorn", "aerosol_can", "apple"]
    assert dataset.category_frequency == {1: "r", 2: "c", 3: "f"}
    assert dataset.image_ids == [5, 9]
    assert dataset[0][1]["masks"].shape == (0, H, W)
    _, target = dataset[1]
    assert target["labels"].tolist() == [3] and target["iscrowd"].tolist() == [0]
    assert torch.equal(target["masks"][0], torch.from_numpy(_box_mask(1, 1, 4, 4)))
    assert LVISInstanceDataset(tmp_path, split="val", train=True).image_ids == [9]
    (tmp_path / "val2017" / "000000000009.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="val2017/000000000009.jpg not found"):
        dataset[1]


def test_coco_custom_config_reads_class_names_from_the_json(tmp_path, compose_cfg):
    categories = [{"id": 7, "name": "bolt"}, {"id": 4, "name": "nut"}]
    anns = [_ann(1, 1, 7, [_rect(0, 0, 3, 3)], [0, 0, 3, 3])]
    ann_file = _write_coco(tmp_path, [{"id": 1}], anns, categories, split="train")
    paths = [f"ann_file={ann_file}", f"img_dir={tmp_path / 'train2017'}"]
    cfg = compose_cfg("train", ["dataset=coco_custom", "dataset.num_classes=3",
                                *(f"dataset.{s}.{p}" for s in ("train", "val") for p in paths)])
    train_set, val_set = instantiate(cfg.dataset.train), instantiate(cfg.dataset.val)
    assert train_set.meta.classes == ["background", "nut", "bolt"]
    assert train_set.meta.category_ids == [0, 4, 7]
    image, target = train_set[0]
    assert target["labels"].tolist() == [2] and image.shape == (3, H, W)
    assert val_set.meta.to_dict() == train_set.meta.to_dict() and not val_set.train
    assert Path(cfg.dataset.gt_json) == val_set.gt_json == ann_file


def test_coco_config_reads_train_and_val_under_dataset_root(tmp_path, compose_cfg):
    categories = [{"id": i, "name": f"c{i}"} for i in range(1, 81)]
    for split in ("train", "val"):
        _write_coco(tmp_path, [{"id": 1}], [_ann(1, 1, 5, [_rect(0, 0, 3, 3)], [0, 0, 3, 3])], categories,
                    split=split)
    cfg = compose_cfg("train", ["dataset=coco", f"dataset.root={tmp_path}"])
    train_set, val_set = instantiate(cfg.dataset.train), instantiate(cfg.dataset.val)
    assert train_set.train and not val_set.train and train_set.meta.num_classes == 81
    assert train_set.gt_json == tmp_path / "annotations" / "instances_train2017.json"
    assert Path(cfg.dataset.gt_json) == val_set.gt_json == tmp_path / "annotations" / "instances_val2017.json"
    _, target = train_set[0]
    assert target["labels"].tolist() == [5]


def test_dataset_configs_without_paths_fail_at_instantiation_naming_what_to_set(compose_cfg):
    for option in ("coco", "lvis", "coco_custom"):
        cfg = compose_cfg("train", [f"dataset={option}"])
        with pytest.raises(InstantiationException) as info:  # hydra wraps the dataset's error
            instantiate(cfg.dataset.train)
        assert isinstance(info.value.__cause__, ValueError)
        assert "root is not set; pass dataset.root=" in str(info.value.__cause__)


def test_synthetic_instance_config_flips_masks_and_boxes_with_the_image(compose_cfg):
    cfg = compose_cfg("train", ["dataset=synthetic_instance", "dataset.train.num_samples=2",
                                "dataset.train.image_size=32", "dataset.train.transforms.hflip_prob=1.0"])
    dataset = instantiate(cfg.dataset.train)
    image, target = dataset[0]
    plain_image, plain = dataset.generate(0)
    assert torch.equal(image, plain_image.flip(-1))
    assert torch.equal(target["masks"], plain["masks"].flip(-1))
    x1, y1, x2, y2 = plain["boxes"].unbind(1)
    assert torch.equal(target["boxes"], torch.stack([32 - x2, y1, 32 - x1, y2], 1))


def test_instance_crop_drops_instances_outside_with_their_labels_and_iscrowd():
    masks = torch.from_numpy(np.stack([_box_mask(0, 0, 2, 2), _box_mask(6, 5, 10, 8)]))
    target = {
        "masks": tv_tensors.Mask(masks),
        "boxes": tv_tensors.BoundingBoxes([[0, 0, 2, 2], [6, 5, 10, 8]], format="XYXY", canvas_size=(H, W)),
        "labels": torch.tensor([1, 2]),
        "iscrowd": torch.tensor([0, 1]),
        "image_id": 1,
    }
    image = tv_tensors.Image(torch.zeros(3, H, W, dtype=torch.uint8))
    transforms = instance_train_transforms(hflip_prob=0.0, crop_size=(4, 4))
    torch.manual_seed(0)
    for _ in range(10):
        out_image, out = transforms(image, target)
        n = len(out["boxes"])
        assert out_image.shape == (3, 4, 4) and out["masks"].shape == (n, 4, 4)
        assert len(out["labels"]) == len(out["iscrowd"]) == n
        assert ((out["boxes"][:, 2:] - out["boxes"][:, :2]) >= 1).all()
        assert out["labels"].tolist() == [[1, 2][i] for i in out["iscrowd"].tolist()]
