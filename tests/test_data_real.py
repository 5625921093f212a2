"""Loaders of the official VOC, VOC+SBD, Cityscapes and ADE20K layouts: miniature trees and a real frame."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image
from torchvision import tv_tensors

from segtrain.data.codecs.image_io import CorruptImageError
from segtrain.data.datasets.ade20k import ADE20K
from segtrain.data.datasets.cityscapes import CityscapesSegmentation
from segtrain.data.datasets.voc import VOCAugSegmentation, VOCSegmentation
from segtrain.data.transforms.presets import semantic_train_transforms

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
from make_fixtures import main, write_ade20k, write_cityscapes, write_voc, write_voc_aug  # noqa: E402

SAMPLE = REPO / ".." / "shared" / "fixtures" / "cityscapes_sample"
# Written out from cityscapesScripts' labels.py for the ids the miniature tree draws.
CITYSCAPES_TRAIN_ID = {0: 255, 1: 255, 4: 255, 7: 0, 8: 1, 9: 255, 11: 2, 17: 5, 21: 8, 23: 10,
                       24: 11, 26: 13, 29: 255, 33: 18}
CITYSCAPES_THING_LABEL = {24: 1, 26: 3, 33: 8}  # person, car, bicycle; caravan (29) has no train id


def _png(path: Path) -> np.ndarray:
    """Stored values read with PIL alone (palette indices for 'P', not colours)."""
    return np.array(Image.open(path)).astype(np.int64)


def _check_item(image, target, index: int) -> None:
    assert isinstance(image, tv_tensors.Image) and image.dtype == torch.uint8 and image.shape[0] == 3
    semantic = target["semantic"]
    assert isinstance(semantic, tv_tensors.Mask) and semantic.dtype == torch.int64
    assert semantic.shape == image.shape[-2:]
    assert target["image_id"] == index
    assert target["orig_size"].tolist() == list(image.shape[-2:])


# ------------------------------------------------------------------------------ VOC
@pytest.mark.parametrize("where", ["parent", "devkit", "voc2012"])
def test_voc_reads_palette_indices_and_keeps_the_255_border(tmp_path, where):
    write_voc(tmp_path)
    root = {"parent": tmp_path, "devkit": tmp_path / "VOCdevkit",
            "voc2012": tmp_path / "VOCdevkit" / "VOC2012"}[where]
    dataset = VOCSegmentation(root, "train")
    assert len(dataset) == 3 and dataset.meta.num_classes == 21
    assert dataset.meta.classes[15] == "person" and dataset.meta.palette[15] == (192, 128, 128)
    for index in range(len(dataset)):
        image, target = dataset[index]
        _check_item(image, target, index)
        expected = _png(tmp_path / "VOCdevkit/VOC2012/SegmentationClass" / f"{target['file_name']}.png")
        assert torch.equal(target["semantic"], torch.from_numpy(expected))
        assert 255 in target["semantic"] and int(target["semantic"][target["semantic"] != 255].max()) <= 20


def test_voc_split_lists_choose_the_items(tmp_path):
    write_voc(tmp_path, n=5)
    lists = tmp_path / "VOCdevkit/VOC2012/ImageSets/Segmentation"
    for split in ("train", "val", "trainval"):
        dataset = VOCSegmentation(tmp_path, split)
        names = [dataset[i][1]["file_name"] for i in range(len(dataset))]
        assert names == (lists / f"{split}.txt").read_text().split()


@pytest.mark.parametrize("lists", [["trainaug.txt"], ["train_aug.txt"], ["train.txt", "aug.txt"]])
def test_voc_aug_train_reads_sbd_masks_and_keeps_voc_own_where_voc_annotates(tmp_path, lists):
    list_name = "train_aug.txt" if lists == ["train_aug.txt"] else "trainaug.txt"
    write_voc_aug(tmp_path, n=6, n_aug=3, list_name=list_name)
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    if lists == ["train.txt", "aug.txt"]:
        (voc / "ImageSets/Segmentation/trainaug.txt").unlink()
    dataset = VOCAugSegmentation(tmp_path, "train")
    names = [dataset[i][1]["file_name"] for i in range(len(dataset))]
    assert names == [f"2007_{i:06d}" for i in range(3)] + [f"2008_{i:06d}" for i in range(3)]
    for index, name in enumerate(names):
        folder = "SegmentationClass" if name.startswith("2007") else "SegmentationClassAug"
        expected = torch.from_numpy(_png(voc / folder / f"{name}.png"))
        assert torch.equal(dataset[index][1]["semantic"], expected)
    val = VOCAugSegmentation(tmp_path, "val")
    assert [val[i][1]["file_name"] for i in range(len(val))] == [f"2007_{i:06d}" for i in range(3, 6)]


def test_voc_aug_train_list_in_deeplab_two_column_format(tmp_path):
    write_voc_aug(tmp_path, n=2, n_aug=1, list_name="train_aug.txt")
    path = tmp_path / "VOCdevkit/VOC2012/ImageSets/Segmentation/train_aug.txt"
    stems = path.read_text().split()
    path.write_text("".join(f"/JPEGImages/{s}.jpg /SegmentationClassAug/{s}.png\n" for s in stems))
    assert len(VOCAugSegmentation(tmp_path, "train")) == 2


def test_voc_aug_without_a_training_list_names_the_folder_and_the_accepted_names(tmp_path):
    write_voc(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"(?s)ImageSets/Segmentation.*trainaug\.txt.*train_aug\.txt"):
        VOCAugSegmentation(tmp_path, "train")


def test_voc_rejects_values_that_are_no_voc_class(tmp_path):
    write_voc(tmp_path, n=2)
    path = tmp_path / "VOCdevkit/VOC2012/SegmentationClass/2007_000000.png"
    Image.fromarray(np.full((24, 32), 30, dtype=np.uint8)).save(path)
    with pytest.raises(ValueError, match=f"{path}.*30"):
        VOCSegmentation(tmp_path, "train")[0]


# ------------------------------------------------------------------------------ Cityscapes
def test_cityscapes_maps_label_ids_to_the_official_train_ids(tmp_path):
    write_cityscapes(tmp_path, split="val")
    dataset = CityscapesSegmentation(tmp_path, "val")
    assert len(dataset) == 4 and dataset.meta.num_classes == 19
    assert dataset.meta.thing_ids == list(range(11, 19))
    assert dataset.meta.classes[13] == "car" and dataset.meta.palette[13] == (0, 0, 142)
    for index in range(len(dataset)):
        image, target = dataset[index]
        _check_item(image, target, index)
        city = target["file_name"].split("_")[0]
        ids = _png(tmp_path / "gtFine/val" / city / f"{target['file_name']}_gtFine_labelIds.png")
        expected = np.vectorize(CITYSCAPES_TRAIN_ID.__getitem__)(ids)
        assert np.array_equal(target["semantic"].numpy(), expected)
    assert [dataset[i][1]["file_name"].split("_")[0] for i in range(4)] == ["frankfurt"] * 2 + ["lindau"] * 2


def test_cityscapes_instances_come_from_instance_ids(tmp_path):
    write_cityscapes(tmp_path, split="val", per_city=1)
    dataset = CityscapesSegmentation(tmp_path, "val", with_instances=True)
    for index in range(len(dataset)):
        _, target = dataset[index]
        city = target["file_name"].split("_")[0]
        inst = _png(tmp_path / "gtFine/val" / city / f"{target['file_name']}_gtFine_instanceIds.png")
        ids = [i for i in np.unique(inst) if i >= 1000 and i // 1000 in CITYSCAPES_THING_LABEL]
        assert ids, "the fixture should hold thing instances"
        assert target["labels"].tolist() == [CITYSCAPES_THING_LABEL[i // 1000] for i in ids]
        assert target["masks"].dtype == torch.bool
        assert np.array_equal(target["masks"].numpy(), np.stack([inst == i for i in ids]))
        for box, mask in zip(target["boxes"].tolist(), target["masks"]):
            ys, xs = torch.nonzero(mask, as_tuple=True)
            assert box == [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]
        assert target["boxes"].format == tv_tensors.BoundingBoxFormat.XYXY
        assert target["iscrowd"].tolist() == [0] * len(ids)


@pytest.mark.skipif(not SAMPLE.is_dir(), reason=f"real Cityscapes sample not found at {SAMPLE}")
def test_cityscapes_real_frame_matches_its_label_train_ids_file():
    dataset = CityscapesSegmentation(SAMPLE, "val", with_instances=True)
    assert len(dataset) == 1
    image, target = dataset[0]
    _check_item(image, target, 0)
    gt = SAMPLE / "gtFine/val/frankfurt/frankfurt_000000_000294_gtFine"
    train_ids = torch.from_numpy(_png(Path(f"{gt}_labelTrainIds.png")))
    label_ids = torch.from_numpy(_png(Path(f"{gt}_labelIds.png")))
    semantic = target["semantic"]
    # The two files were downscaled independently (PROVENANCE.md): boundaries differ by ~0.2%.
    assert (semantic == train_ids).float().mean() > 0.995
    # Each label id present maps to the train id most of its pixels carry in the official file.
    for label_id in label_ids.unique().tolist():
        where = label_ids == label_id
        assert semantic[where].unique().tolist() == [train_ids[where].mode().values.item()], label_id
    inst = torch.from_numpy(_png(Path(f"{gt}_instanceIds.png")))
    assert len(target["labels"]) > 0
    for mask, label in zip(target["masks"], target["labels"].tolist()):
        (instance_id,) = inst[mask].unique().tolist()
        assert torch.equal(mask, inst == instance_id) and instance_id >= 1000
        assert semantic[mask].unique().tolist() == [10 + label]  # thing train ids are 11..18


def test_cityscapes_rejects_label_ids_outside_the_table(tmp_path):
    write_cityscapes(tmp_path, cities=("ulm",), per_city=1)
    path = tmp_path / "gtFine/val/ulm/ulm_000000_000019_gtFine_labelIds.png"
    Image.fromarray(np.full((32, 64), 40, dtype=np.uint8)).save(path)
    with pytest.raises(ValueError, match=f"{path}.*40"):
        CityscapesSegmentation(tmp_path, "val")[0]


# ------------------------------------------------------------------------------ ADE20K
@pytest.mark.parametrize(("where", "split"), [("parent", "validation"), ("data", "val")])
def test_ade20k_ignores_zero_and_shifts_the_classes_down(tmp_path, where, split):
    write_ade20k(tmp_path, split="validation")
    dataset = ADE20K(tmp_path if where == "parent" else tmp_path / "ADEChallengeData2016", split)
    assert len(dataset) == 3 and dataset.meta.num_classes == 150
    assert dataset.meta.classes[:3] == ["wall", "building", "sky"]
    for index in range(len(dataset)):
        image, target = dataset[index]
        _check_item(image, target, index)
        stored = _png(tmp_path / "ADEChallengeData2016/annotations/validation" / f"{target['file_name']}.png")
        assert np.array_equal(target["semantic"].numpy(), np.where(stored == 0, 255, stored - 1))
        assert target["semantic"][0, :3].tolist() == [255, 0, 149]
    assert dataset[0][1]["file_name"] == "ADE_val_00000001"


# ------------------------------------------------------------------------------ errors
def _trees(tmp_path: Path):
    """(build, tree root, loader, split, an image, its label map) per dataset."""
    write_voc(tmp_path / "voc", n=2)
    write_cityscapes(tmp_path / "cs", cities=("ulm",), per_city=2)
    write_ade20k(tmp_path / "ade", n=2)
    voc = tmp_path / "voc/VOCdevkit/VOC2012"
    ade = tmp_path / "ade/ADEChallengeData2016"
    return {
        "voc": (lambda: VOCSegmentation(tmp_path / "voc", "train"), voc / "JPEGImages/2007_000000.jpg",
                voc / "SegmentationClass/2007_000000.png"),
        "cityscapes": (lambda: CityscapesSegmentation(tmp_path / "cs", "val"),
                       tmp_path / "cs/leftImg8bit/val/ulm/ulm_000000_000019_leftImg8bit.png",
                       tmp_path / "cs/gtFine/val/ulm/ulm_000000_000019_gtFine_labelIds.png"),
        "ade20k": (lambda: ADE20K(tmp_path / "ade", "validation"),
                   ade / "images/validation/ADE_val_00000001.jpg",
                   ade / "annotations/validation/ADE_val_00000001.png"),
    }


LOADERS = {"voc": VOCSegmentation, "cityscapes": CityscapesSegmentation, "ade20k": ADE20K}
EXPECTED_TREE = {"voc": "JPEGImages", "cityscapes": "leftImg8bit", "ade20k": "ADEChallengeData2016"}


@pytest.mark.parametrize("name", LOADERS)
def test_missing_root_names_the_path_and_the_expected_tree(tmp_path, name):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=f"(?s){missing}.*{EXPECTED_TREE[name]}"):
        LOADERS[name](missing, "val")
    with pytest.raises(ValueError, match=f"(?s)dataset.root=.*{EXPECTED_TREE[name]}"):
        LOADERS[name](None, "val")


@pytest.mark.parametrize(("name", "split", "missing"), [
    ("voc", "test", "ImageSets/Segmentation/test.txt"),
    ("cityscapes", "train", "leftImg8bit/train"),
    ("ade20k", "training", "images/training"),
])
def test_missing_split_names_the_missing_path(tmp_path, name, split, missing):
    _trees(tmp_path)
    root = {"voc": tmp_path / "voc", "cityscapes": tmp_path / "cs", "ade20k": tmp_path / "ade"}[name]
    with pytest.raises(FileNotFoundError, match=f"(?s){missing}.*not found.*{EXPECTED_TREE[name]}"):
        LOADERS[name](root, split)


@pytest.mark.parametrize("name", LOADERS)
def test_missing_mask_names_the_frame_and_folder(tmp_path, name):
    build, image, label = _trees(tmp_path)[name]
    label.unlink()
    stem = image.name.split("_leftImg8bit")[0].removesuffix(".jpg")
    with pytest.raises(FileNotFoundError, match=f"(?s){stem}.*{EXPECTED_TREE[name]}") as info:
        build()
    assert str(label.parent) in str(info.value)


@pytest.mark.parametrize("name", ["cityscapes", "ade20k"])
def test_mask_without_an_image_is_an_unmatched_stem(tmp_path, name):
    build, image, label = _trees(tmp_path)[name]
    image.unlink()
    with pytest.raises(ValueError, match="without an image"):
        build()


def test_voc_listed_image_missing_is_named(tmp_path):
    build, image, _ = _trees(tmp_path)["voc"]
    image.unlink()
    with pytest.raises(FileNotFoundError, match=f"{image.parent}.*2007_000000.jpg"):
        build()


@pytest.mark.parametrize("name", LOADERS)
def test_corrupt_image_is_named(tmp_path, name):
    build, image, _ = _trees(tmp_path)[name]
    image.write_bytes(image.read_bytes()[:40])
    dataset = build()
    index = next(i for i, record in enumerate(dataset._records) if record[1] == image)
    with pytest.raises(CorruptImageError, match=str(image)):
        dataset[index]


@pytest.mark.parametrize("name", LOADERS)
def test_label_of_another_size_than_its_image_names_both(tmp_path, name):
    build, image, label = _trees(tmp_path)[name]
    Image.fromarray(np.zeros((5, 7), dtype=np.uint8)).save(label)
    with pytest.raises(ValueError, match=f"{label}.*{image}"):
        build()[0]


# ------------------------------------------------------------------------------ transforms
@pytest.mark.parametrize("name", LOADERS)
def test_transforms_run_last_on_the_mapped_target(tmp_path, name):
    build, _, _ = _trees(tmp_path)[name]
    plain = build()
    seen = []

    def record(image, target):
        seen.append(target["semantic"].clone())
        return image.flip(-1), {**target, "semantic": tv_tensors.Mask(target["semantic"].flip(-1))}

    plain.transforms = record
    image, target = plain[0]
    plain.transforms = None
    expected_image, expected = plain[0]
    assert torch.equal(seen[0], expected["semantic"])  # mapping (e.g. ADE 0 -> 255) came first
    assert torch.equal(image, expected_image.flip(-1))
    assert torch.equal(target["semantic"], expected["semantic"].flip(-1))


def test_semantic_train_transforms_crop_pads_with_ignore(tmp_path):
    write_ade20k(tmp_path, split="validation", n=1)
    transforms = semantic_train_transforms(hflip_prob=0.0, crop_size=(40, 48))
    dataset = ADE20K(tmp_path, "val", transforms=transforms)
    image, target = dataset[0]
    assert image.shape == (3, 40, 48) and target["semantic"].shape == (40, 48)
    assert (target["semantic"][24:] == 255).all() and (target["semantic"][:, 32:] == 255).all()


# ------------------------------------------------------------------------------ configs and script
CONFIG_TREES = {
    "voc": lambda root: write_voc(root),
    "voc_aug": lambda root: write_voc_aug(root),
    "cityscapes": lambda root: [write_cityscapes(root, split=split) for split in ("train", "val")],
    "ade20k": lambda root: [write_ade20k(root, split=split) for split in ("training", "validation")],
}
CROP = {"voc": (512, 512), "voc_aug": (512, 512), "cityscapes": (512, 1024), "ade20k": (512, 512)}


@pytest.mark.parametrize("name", CONFIG_TREES)
def test_dataset_config_instantiates_on_a_miniature_tree(compose_cfg, tmp_path, name):
    CONFIG_TREES[name](tmp_path)
    cfg = compose_cfg("train", [f"dataset={name}", f"dataset.root={tmp_path}"])
    train, val = instantiate(cfg.dataset.train), instantiate(cfg.dataset.val)
    assert train.meta.num_classes == val.meta.num_classes == cfg.dataset.num_classes
    assert train.meta.ignore_index == cfg.dataset.ignore_index == 255
    image, target = train[0]
    assert image.shape[-2:] == CROP[name] and target["semantic"].shape == CROP[name]
    assert list(val[0][0].shape[-2:]) == val[0][1]["orig_size"].tolist()
    if name == "voc_aug":
        assert len(train) == 6 and type(val) is VOCSegmentation


def test_make_fixtures_main_writes_the_chosen_layouts(tmp_path, capsys):
    assert main([str(tmp_path), "--which", "voc,ade20k"]) == 0
    assert (tmp_path / "voc/VOCdevkit/VOC2012/JPEGImages").is_dir()
    assert len(ADE20K(tmp_path / "ade20k", "val")) == 3
    assert not (tmp_path / "cityscapes").exists()
    with pytest.raises(SystemExit):
        main([str(tmp_path), "--which", "kitti"])
    shutil.rmtree(tmp_path / "voc")
