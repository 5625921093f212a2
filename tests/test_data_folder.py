"""dataset=folder: users' image/mask folders matched by stem, classes.yaml, label_map, colour masks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import run_cli
from PIL import Image

from segtrain.builders import build_data
from segtrain.data.codecs.image_io import write_label
from segtrain.data.datasets.folder import FolderDataset


@pytest.fixture(autouse=True)
def label_scan_cache(tmp_path, monkeypatch) -> Path:
    """The label scan's cache goes under tmp_path, never into the user's ~/.cache."""
    monkeypatch.setenv("SEGTRAIN_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def write_pair(root: Path, split: str, stem: str, mask: np.ndarray, image_ext: str = ".png",
               image_size: tuple[int, int] | None = None) -> np.ndarray:
    """Write a random RGB image (default: the mask's size) and `mask` (H, W) or (H, W, 3) as PNG."""
    height, width = image_size or mask.shape[:2]
    image = np.random.default_rng(len(stem)).integers(0, 256, (height, width, 3), dtype=np.uint8)
    (root / split / "images").mkdir(parents=True, exist_ok=True)
    (root / split / "masks").mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(root / split / "images" / f"{stem}{image_ext}")
    if mask.ndim == 3:
        Image.fromarray(mask.astype(np.uint8), "RGB").save(root / split / "masks" / f"{stem}.png")
    else:
        write_label(root / split / "masks" / f"{stem}.png", mask)
    return image


def write_tree(root: Path, num_classes: int = 3, size: int = 16, count: int = 3) -> Path:
    """A valid tree: `count` pairs per split whose masks use every class 0..num_classes-1."""
    for split in ("train", "val"):
        for i in range(count):
            mask = (np.arange(size * size).reshape(size, size) + i) % num_classes
            write_pair(root, split, f"{split}_{i}", mask)
    return root


def test_items_pair_images_and_masks_by_stem(tmp_path):
    masks = {"b": np.full((6, 5), 2), "a": np.eye(6, 5, dtype=np.int64)}
    images = {stem: write_pair(tmp_path, "train", stem, m, ".jpg" if stem == "a" else ".png")
              for stem, m in masks.items()}
    dataset = FolderDataset(tmp_path, "train", num_classes=3)
    assert len(dataset) == 2
    for index, stem in enumerate(["a", "b"]):  # sorted by stem, whatever the image suffix
        image, target = dataset[index]
        assert target["file_name"] == stem and target["image_id"] == index
        assert target["semantic"].dtype == torch.int64
        assert torch.equal(target["semantic"], torch.as_tensor(masks[stem], dtype=torch.int64))
        assert target["orig_size"].tolist() == [6, 5] and image.shape == (3, 6, 5)
    assert torch.equal(dataset[1][0].permute(1, 2, 0), torch.from_numpy(images["b"]))  # PNG: lossless


def test_classes_yaml_gives_names_palette_and_the_void_value(tmp_path):
    write_pair(tmp_path, "train", "x", np.array([[0, 1], [2, 7]]))
    palette = [[0, 0, 0], [128, 64, 128], [0, 0, 142]]
    (tmp_path / "classes.yaml").write_text(yaml.safe_dump(
        {"names": ["background", "road", "car"], "palette": palette, "ignore_index": 7}))
    dataset = FolderDataset(tmp_path, "train")
    assert dataset.meta.classes == ["background", "road", "car"]
    assert dataset.meta.palette == [tuple(c) for c in palette]
    assert dataset.meta.ignore_index == 255
    assert dataset[0][1]["semantic"].tolist() == [[0, 1], [2, 255]]  # raw 7 is void


@pytest.mark.parametrize(("label_map", "expected"), [
    ({255: 1}, [[0, 1], [1, 0]]),           # a binary mask saved as 0/255
    ({11: 255}, [[0, 255], [255, 0]]),      # a void value of the data set
])
def test_label_map_remaps_raw_values(tmp_path, label_map, expected):
    raw = max(label_map)
    write_pair(tmp_path, "train", "x", np.array([[0, raw], [raw, 0]]))
    dataset = FolderDataset(tmp_path, "train", label_map=label_map)
    assert dataset[0][1]["semantic"].tolist() == expected
    assert dataset.meta.num_classes == (2 if label_map == {255: 1} else 1)


def test_colour_masks_map_to_ids_through_the_palette(tmp_path):
    palette = [[0, 0, 0], [255, 0, 0], [0, 255, 0]]
    ids = np.array([[0, 1, 2], [2, 1, 0]])
    write_pair(tmp_path, "train", "x", np.array(palette)[ids])
    (tmp_path / "classes.yaml").write_text(yaml.safe_dump({"names": ["bg", "red", "green"],
                                                           "palette": palette}))
    assert FolderDataset(tmp_path, "train")[0][1]["semantic"].tolist() == ids.tolist()


def test_unknown_mask_colour_is_an_error_naming_the_file_and_colour(tmp_path):
    write_pair(tmp_path, "train", "x", np.array([[[0, 0, 0], [9, 8, 7]]]))
    (tmp_path / "classes.yaml").write_text(yaml.safe_dump({"names": ["bg"], "palette": [[0, 0, 0]]}))
    with pytest.raises(ValueError, match=r"x\.png: colour \(9, 8, 7\) is not in the palette"):
        FolderDataset(tmp_path, "train")[0]


def test_classes_are_counted_from_the_masks_and_named_by_id(tmp_path):
    write_pair(tmp_path, "train", "a", np.array([[0, 1], [255, 1]]))
    write_pair(tmp_path, "train", "b", np.array([[3, 0], [0, 0]]))
    dataset = FolderDataset(tmp_path, "train")
    assert dataset.meta.classes == ["0", "1", "2", "3"]


def test_label_outside_the_classes_names_the_file_and_values(tmp_path):
    write_pair(tmp_path, "train", "bad_one", np.array([[0, 5], [6, 1]]))
    with pytest.raises(ValueError, match=r"bad_one\.png: label values \[5, 6\] are outside"):
        FolderDataset(tmp_path, "train", num_classes=2)  # found by the label scan, before any item
    dataset = FolderDataset(tmp_path, "train", num_classes=2, strict=False)
    with pytest.raises(ValueError, match=r"bad_one\.png: label values \[5, 6\] are outside"):
        dataset[0]


def test_mask_of_another_size_than_its_image_names_the_mask(tmp_path):
    write_pair(tmp_path, "train", "odd", np.zeros((4, 4), dtype=np.int64), image_size=(4, 5))
    with pytest.raises(ValueError, match=r"odd\.png is \(4, 4\).*is \(4, 5\)"):
        FolderDataset(tmp_path, "train", num_classes=2)[0]


def _missing_split(root):
    write_tree(root)
    return "val2", str(root / "val2" / "images")


def _image_without_mask(root):
    write_tree(root)
    (root / "train" / "masks" / "train_1.png").unlink()
    return "train", "train_1"


def _mask_without_image(root):
    write_tree(root)
    (root / "train" / "images" / "train_2.png").unlink()
    return "train", "train_2"


def _stray_file(root):
    write_tree(root)
    (root / "train" / "images" / "notes.txt").write_text("x")
    return "train", "notes.txt"


@pytest.mark.parametrize("broken", [_missing_split, _image_without_mask, _mask_without_image, _stray_file])
def test_layout_problems_name_the_path_and_show_the_expected_tree(tmp_path, broken):
    split, named = broken(tmp_path)
    with pytest.raises((FileNotFoundError, ValueError)) as info:
        FolderDataset(tmp_path, split)
    message = str(info.value)
    assert named in message and str(tmp_path) in message
    assert "train/masks/*.png" in message  # the expected tree


def test_missing_root_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
        FolderDataset(tmp_path / "nope")


def test_bad_classes_yaml_names_the_file(tmp_path):
    write_tree(tmp_path)
    (tmp_path / "classes.yaml").write_text(yaml.safe_dump({"names": ["a", "b"], "palette": [[0, 0, 0]]}))
    with pytest.raises(ValueError, match=r"classes\.yaml: palette must be one"):
        FolderDataset(tmp_path, "train")


def test_build_data_fills_num_classes_from_the_train_masks(tmp_path, compose_cfg):
    write_tree(tmp_path, num_classes=4)
    for i in range(3):  # val's masks hold class 0 only: the class count must come from train
        write_pair(tmp_path, "val", f"val_{i}", np.zeros((16, 16), dtype=np.int64))
    cfg = compose_cfg("train", ["dataset=folder", f"dataset.root={tmp_path}"])
    assert cfg.dataset.num_classes is None
    train_set, val_set = build_data(cfg)
    assert cfg.dataset.num_classes == 4 and cfg.model.num_classes == 4
    assert val_set.meta.classes == train_set.meta.classes == ["0", "1", "2", "3"]


@pytest.mark.slow
def test_train_on_a_folder_dataset_runs_two_iterations(tmp_path):
    root = write_tree(tmp_path / "data", num_classes=3, size=32, count=4)
    result = run_cli(
        "train", "dataset=folder", f"dataset.root={root}", "model=unet", "trainer.max_iters=2",
        "model.depth=2", "data.batch_size=2", "data.num_workers=0", "trainer.device=cpu",
        f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    from segtrain.utils.checkpoint import load_checkpoint

    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert ckpt["trainer"]["step"] == 2
    assert ckpt["meta"]["classes"] == ["0", "1", "2"]
