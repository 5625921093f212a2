"""dataset=instance_folder (issue 17): instance targets from plain mask files in three layouts,
equal to the source masks and to the COCO-JSON path's targets on the same data."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import run_cli
from PIL import Image
from torch.utils.data import DataLoader

from segtrain.data.datasets.coco import COCOInstanceDataset
from segtrain.data.datasets.instance_folder import InstanceFolderDataset
from segtrain.data.datasets.synthetic import SyntheticDataset
from segtrain.data.export.coco import write_coco_instances
from segtrain.inference.writers import instance_id_map

LAYOUTS = ("per_sample", "per_object", "instance_map")


def source(split: str = "val", count: int = 4, size: int = 48) -> SyntheticDataset:
    return SyntheticDataset(split=split, num_samples=count, image_size=size, num_classes=4, max_shapes=5)


def _png(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def write_layout(base: Path, layout: str, dataset, classes: bool = True) -> list[dict]:
    """`dataset`'s items under `base` in `layout`; returns their targets (stems 's0', 's1', ...)."""
    targets = []
    for i in range(len(dataset)):
        image, target = dataset[i]
        stem, pixels = f"s{i}", image.permute(1, 2, 0).numpy()
        masks = target["masks"].numpy()
        if layout == "per_sample":
            _png(pixels, base / stem / "images" / f"{stem}.png")
            (base / stem / "masks").mkdir(parents=True)
            for j, mask in enumerate(masks):
                _png(mask.astype(np.uint8) * 255, base / stem / "masks" / f"m{j:03d}.png")
        elif layout == "per_object":
            _png(pixels, base / "images" / f"{stem}.png")
            (base / "masks" / stem).mkdir(parents=True)
            for j, mask in enumerate(masks):
                _png(mask.astype(np.uint8) * 255, base / "masks" / stem / f"m{j:03d}.png")
        else:
            _png(pixels, base / "images" / f"{stem}.png")
            ids = np.zeros(masks.shape[1:], np.uint8)
            semantic = np.zeros(masks.shape[1:], np.uint8)
            for j, (mask, label) in enumerate(zip(masks, target["labels"].tolist())):
                ids[mask], semantic[mask] = j + 1, label
            _png(ids, base / "instances" / f"{stem}.png")
            if classes:
                _png(semantic, base / "classes" / f"{stem}.png")
        targets.append(target)
    return targets


def assert_same(item_target: dict, expected: dict, labels: bool = True) -> None:
    assert torch.equal(item_target["masks"], expected["masks"])
    boxes = item_target["boxes"].as_subclass(torch.Tensor)
    assert torch.equal(boxes, expected["boxes"].as_subclass(torch.Tensor))
    if labels:
        assert torch.equal(item_target["labels"], expected["labels"])
    assert item_target["labels"].dtype == torch.int64 and item_target["masks"].dtype == torch.bool
    assert torch.equal(item_target["iscrowd"], torch.zeros(len(expected["labels"]), dtype=torch.int64))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_layout_is_detected_and_gives_the_source_masks_labels_and_boxes(tmp_path, layout):
    expected = {split: write_layout(tmp_path / split, layout, source(split)) for split in ("train", "val")}
    for split in ("train", "val"):
        dataset = InstanceFolderDataset(tmp_path, split)
        assert dataset.layout == layout and len(dataset) == 4
        assert dataset.meta.classes == ["background", "1", "2", "3"] if layout == "instance_map" else [
            "background", "object"]
        assert dataset.meta.thing_ids == list(range(1, dataset.num_classes))
        for i, want in enumerate(expected[split]):
            image, target = dataset[i]
            assert image.dtype == torch.uint8 and target["file_name"] == f"s{i}" and target["image_id"] == i
            assert torch.equal(image, source(split)[i][0])
            assert_same(target, want, labels=layout == "instance_map")
            if layout != "instance_map":
                assert target["labels"].tolist() == [1] * len(want["labels"])


def test_targets_equal_the_coco_json_path_on_the_same_data(tmp_path):
    data = source("val", count=3)
    write_layout(tmp_path / "folder" / "train", "instance_map", source("train", 2))
    write_layout(tmp_path / "folder" / "val", "instance_map", data)
    write_coco_instances(data, tmp_path / "coco")
    ours = InstanceFolderDataset(tmp_path / "folder", "val")
    coco = COCOInstanceDataset(tmp_path / "coco", split="val", train=False)
    assert ours.meta.thing_ids == coco.meta.thing_ids and ours.num_classes == coco.meta.num_classes
    for i in range(3):
        (image, target), (coco_image, coco_target) = ours[i], coco[i]
        assert torch.equal(image, coco_image)
        assert_same(target, coco_target)


def test_a_forced_layout_is_used_and_a_wrong_one_names_the_missing_folder(tmp_path):
    write_layout(tmp_path / "train", "per_object", source("train", 2))
    write_layout(tmp_path / "val", "per_object", source("val", 2))
    assert InstanceFolderDataset(tmp_path, "val", layout="per_object").layout == "per_object"
    with pytest.raises(FileNotFoundError, match=r"layout=instance_map: .*instances not found"):
        InstanceFolderDataset(tmp_path, "val", layout="instance_map")
    with pytest.raises(ValueError, match="dataset.layout='coco'; expected auto or one of per_sample"):
        InstanceFolderDataset(tmp_path, "val", layout="coco")


def test_one_set_is_split_by_a_seeded_val_fraction_reproducibly_and_logged(tmp_path, caplog):
    write_layout(tmp_path, "per_sample", source("train", 10, size=24))
    with caplog.at_level(logging.INFO, logger="segtrain.data.datasets.instance_folder"):
        train = InstanceFolderDataset(tmp_path, "train", val_fraction=0.3)
    val = InstanceFolderDataset(tmp_path, "val", val_fraction=0.3)
    assert "instance_folder: 7 train / 3 val images (val_fraction 0.3, seed 0)" in caplog.text
    stems = lambda d: [s.stem for s in d.samples]  # noqa: E731
    assert len(stems(train)) == 7 and len(stems(val)) == 3
    assert sorted(stems(train) + stems(val)) == sorted(f"s{i}" for i in range(10))
    assert stems(InstanceFolderDataset(tmp_path, "val", val_fraction=0.3)) == stems(val)
    others = [stems(InstanceFolderDataset(tmp_path, "val", val_fraction=0.3, seed=s)) for s in range(1, 6)]
    assert any(o != stems(val) for o in others)


@pytest.mark.parametrize("setup, error, match", [
    (lambda root: None, ValueError, "is empty; expected one of the layouts"),
    (lambda root: write_layout(root, "per_object", source("train", 2)), ValueError,
     r"dataset.val_fraction=1.5; expected a fraction in \(0, 1\)"),
    (lambda root: (root / "images").mkdir() or (root / "masks").mkdir() or _png(
        np.zeros((4, 4), np.uint8), root / "masks" / "a.png"), ValueError,
     "semantic layout .dataset=folder."),
])
def test_bad_roots_and_options_are_errors_saying_what_was_expected(tmp_path, setup, error, match):
    setup(tmp_path)
    with pytest.raises(error, match=match):
        InstanceFolderDataset(tmp_path, "train", val_fraction=1.5 if "val_fraction" in match else 0.5)


def test_an_image_without_mask_folder_is_an_error_naming_it(tmp_path):
    write_layout(tmp_path, "per_sample", source("train", 3, size=24))
    for path in (tmp_path / "s1" / "masks").iterdir():
        path.unlink()
    (tmp_path / "s1" / "masks").rmdir()
    with pytest.raises(ValueError, match=r"image .*s1\.png has no mask folder .*s1/masks"):
        InstanceFolderDataset(tmp_path, "train")
    write_layout(tmp_path / "po", "per_object", source("train", 3, size=24))
    (tmp_path / "po" / "images" / "s2.png").unlink()
    with pytest.raises(ValueError, match=r"1 entries in .*po/masks have no counterpart .* in .*images: s2"):
        InstanceFolderDataset(tmp_path / "po", "train")


def test_a_mask_of_another_size_is_an_error_naming_both_files_through_loader_workers(tmp_path):
    write_layout(tmp_path, "per_object", source("train", 4, size=24))
    bad = sorted((tmp_path / "masks" / "s0").iterdir())[0]
    _png(np.zeros((20, 24), np.uint8), bad)
    dataset = InstanceFolderDataset(tmp_path, "val", val_fraction=0.5, seed=0)
    if "s0" not in [s.stem for s in dataset.samples]:
        dataset = InstanceFolderDataset(tmp_path, "train", val_fraction=0.5, seed=0)
    loader = DataLoader(dataset, batch_size=1, num_workers=1, collate_fn=lambda batch: batch)
    message = rf"{bad} is \(20, 24\) \(H, W\) but its image .*s0\.png is \(24, 24\)"
    with pytest.raises(ValueError, match=message):
        list(loader)


def _jpeg(mask: np.ndarray, path: Path) -> None:
    buffer = io.BytesIO()
    Image.fromarray(mask).save(buffer, format="JPEG", quality=75)
    path.write_bytes(buffer.getvalue())


def test_jpeg_and_soft_masks_are_thresholded_overlaps_kept_empty_skipped_and_counted(tmp_path, caplog):
    root = tmp_path / "data"
    for split in ("train", "val"):
        _png(np.full((32, 32, 3), 100, np.uint8), root / split / "images" / "a.png")
        folder = root / split / "masks" / "a"
        folder.mkdir(parents=True)
        square = np.zeros((32, 32), np.uint8)
        square[4:20, 4:20] = 255
        _jpeg(square, folder / "1.jpg")  # JPEG noise around 0 and 255
        soft = np.zeros((32, 32), np.uint8)
        soft[10:26, 10:26] = 200
        soft[9, 10:26] = 90  # an anti-aliased edge, below half of 200: not the object
        _png(soft, folder / "2.png")  # overlaps the square on [10:20, 10:20]
        _png(np.zeros((32, 32), np.uint8), folder / "3.png")  # empty
    with caplog.at_level(logging.WARNING, logger="segtrain.data.datasets.instance_folder"):
        dataset = InstanceFolderDataset(root, "train")
        _, target = dataset[0]
    want = torch.zeros(2, 32, 32, dtype=torch.bool)
    want[0, 4:20, 4:20], want[1, 10:26, 10:26] = True, True
    assert torch.equal(target["masks"], want)
    assert target["boxes"].tolist() == [[4, 4, 20, 20], [10, 10, 26, 26]]
    assert "thresholded at half its maximum" in caplog.text and "3.png is empty: skipped" in caplog.text
    messages = [p.message for p in dataset.label_problems]
    assert any("2 mask files are not exactly binary" in m and "1.jpg" in m for m in messages), messages
    assert any("1 mask files are empty and were skipped" in m for m in messages), messages
    result = run_cli("data", "check", "dataset=instance_folder", f"dataset.root={root}",
                     f"hydra.run.dir={tmp_path / 'check'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "2 overlap another object (in 1 images)" in result.stdout
    assert "WARNING: train: 2 mask files are not exactly binary" in result.stdout
    assert "WARNING: val: 1 mask files are empty and were skipped" in result.stdout


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16_bit_instance_ids_give_hundreds_of_objects(tmp_path, suffix):
    ids = np.arange(1, 21 * 20 + 1, dtype=np.uint16).reshape(20, 21)  # 420 one-pixel objects
    ids[0, 0] = 0
    for split in ("train", "val"):
        _png(np.zeros((20, 21, 3), np.uint8), tmp_path / split / "images" / "a.png")
        (tmp_path / split / "instances").mkdir()
        Image.fromarray(ids).save(tmp_path / split / "instances" / f"a{suffix}")
    _, target = InstanceFolderDataset(tmp_path, "val")[0]
    assert len(target["masks"]) == 419
    flat = target["masks"].reshape(419, -1).int().argmax(1)
    assert flat.tolist() == list(range(1, 420))  # object k (id k + 1) is the pixel holding k + 1
    assert target["boxes"][-1].tolist() == [20, 19, 21, 20]


def test_classes_come_from_the_class_map_and_an_object_on_two_classes_names_both_files(tmp_path):
    write_layout(tmp_path / "train", "instance_map", source("train", 2))
    write_layout(tmp_path / "val", "instance_map", source("val", 2))
    (tmp_path / "classes.yaml").write_text(yaml.safe_dump({"names": ["bg", "a", "b", "c"]}))
    assert InstanceFolderDataset(tmp_path, "val").meta.classes == ["bg", "a", "b", "c"]
    semantic = np.array(Image.open(tmp_path / "val" / "classes" / "s1.png"))
    objects = np.array(Image.open(tmp_path / "val" / "instances" / "s1.png"))
    ys, xs = np.nonzero(objects == 1)
    semantic[ys[0], xs[0]] = 3 if semantic[ys[0], xs[0]] != 3 else 2
    _png(semantic, tmp_path / "val" / "classes" / "s1.png")
    dataset = InstanceFolderDataset(tmp_path, "val")
    with pytest.raises(ValueError, match=r"object 1 of .*val/instances/s1\.png lies on class values "
                                         r"\[\d, \d\] of .*val/classes/s1\.png"):
        dataset[1]


def test_data_check_prints_images_and_objects_per_split(tmp_path):
    expected = {split: write_layout(tmp_path / split, "per_sample", source(split, 3, size=32))
                for split in ("train", "val")}
    result = run_cli("data", "check", "dataset=instance_folder", f"dataset.root={tmp_path}",
                     f"hydra.run.dir={tmp_path / 'check'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for split in ("train", "val"):
        objects = sum(len(t["labels"]) for t in expected[split])
        assert f"{split}: 3 images" in result.stdout
        assert f"objects: {objects} in 3 images" in result.stdout
    shown = run_cli("data", "show", "dataset=instance_folder", f"dataset.root={tmp_path}", "split=val",
                    f"output={tmp_path / 'grid.png'}", f"hydra.run.dir={tmp_path / 'show'}", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert Image.open(tmp_path / "grid.png").size[0] > 0


def test_instance_id_map_numbers_detections_by_score_and_the_best_wins_overlaps():
    masks = torch.zeros(3, 4, 6, dtype=torch.bool)
    masks[0, :, :3], masks[1, :, 2:], masks[2, 0, 0] = True, True, True  # 0 and 1 share column 2
    instances = {"masks": masks, "scores": torch.tensor([0.6, 0.9, 0.1])}
    ids = instance_id_map(instances, (4, 6), score_thresh=0.5)
    assert ids.dtype == np.uint8
    assert ids[:, :2].tolist() == [[2, 2]] * 4 and ids[:, 2:].tolist() == [[1] * 4] * 4
    many = {"masks": torch.ones(300, 2, 2, dtype=torch.bool), "scores": torch.linspace(0.9, 0.6, 300)}
    ids = instance_id_map(many, (2, 2), score_thresh=0.5)
    assert ids.dtype == np.uint16 and ids.tolist() == [[1, 1], [1, 1]]


@pytest.mark.slow
def test_train_then_predict_writes_instance_id_pngs(tmp_path):
    for split in ("train", "val"):
        write_layout(tmp_path / "data" / split, "instance_map", source(split, 4, size=64))
    overrides = ["model=maskrcnn_small", "dataset=instance_folder", f"dataset.root={tmp_path / 'data'}",
                 "model.min_size=64", "model.max_size=64", "model.box_score_thresh=0.0", "data.batch_size=2",
                 "data.num_workers=1", "trainer.max_iters=2", "trainer.eval_every=2", "trainer.device=cpu",
                 "trainer.vis_images=0", f"hydra.run.dir={tmp_path / 'run'}"]
    trained = run_cli("train", *overrides, cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr[-3000:]
    ckpt = tmp_path / "run" / "checkpoints" / "last.pt"
    result = run_cli("predict", f"ckpt={ckpt}", f"input={tmp_path / 'data' / 'val' / 'images'}",
                     f"output={tmp_path / 'out'}", "overlay=false", "score_thresh=0.0", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((tmp_path / "out" / "instances.json").read_text())
    maps = sorted((tmp_path / "out" / "instances").iterdir())
    assert [p.name for p in maps] == [f"s{i}.png" for i in range(4)]
    for path in maps:
        ids = np.array(Image.open(path))
        assert ids.shape == (64, 64)
        detections = [a for a in data["annotations"] if Path(a["file_name"]).stem == path.stem]
        assert ids.max() <= len(detections)
    # the written maps read back as an instance_map dataset
    (tmp_path / "out" / "images").symlink_to(tmp_path / "data" / "val" / "images")
    assert InstanceFolderDataset(tmp_path / "out", "val", layout="instance_map", val_fraction=0.5).layout
