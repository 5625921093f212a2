"""Bad-input matrix, silent wrong data (issue 13 §2): dataset=folder masks whose values would
train the wrong model without a word (0/255 binary masks, JPEG masks, compression noise, a stray
value, a bad value in one val mask, classes.yaml's void value) must stop `train` and fail
`data check` with the fix; the label scan behind it is cached outside the dataset folder."""

from __future__ import annotations

import io
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import TINY, run_cli
from PIL import Image

from segtrain.data.datasets.folder import FolderDataset

SIZE = 48  # mask side: 4 masks give 9216 pixels per split, so 2 pixels are a rare value (< 0.1%)
# TINY without its synthetic-dataset keys; loader workers on (failures must end them too).
FOLDER_TINY = [o for o in TINY if not o.startswith(("dataset.", "data.num_workers"))] + ["data.num_workers=1"]
EXIT_WITHIN_S = 90  # a failing run stops while building its datasets; generous on a loaded 2-core VM


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    """The label scan's cache: under tmp_path (run_cli passes the environment on)."""
    monkeypatch.setenv("SEGTRAIN_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def disc(index: int, value: int = 255) -> np.ndarray:
    """A SIZE x SIZE uint8 mask: a disc of `value` on 0, its centre moved by `index`."""
    y, x = np.mgrid[:SIZE, :SIZE]
    centre = SIZE // 3 + 4 * index
    return np.where((y - centre) ** 2 + (x - SIZE // 2) ** 2 < (SIZE // 4) ** 2, value, 0).astype(np.uint8)


def three_classes(index: int) -> np.ndarray:
    """Classes 0, 1, 2 in vertical stripes, each about a third of the pixels."""
    return ((np.arange(SIZE * SIZE).reshape(SIZE, SIZE) // 7 + index) % 3).astype(np.uint8)


def write_tree(root: Path, make_mask, count: int = 4, mask_ext: str = ".png", **classes) -> Path:
    """ROOT/{train,val}/{images,masks}: `count` pairs per split, mask i = make_mask(split, i)."""
    for split in ("train", "val"):
        (root / split / "images").mkdir(parents=True, exist_ok=True)
        (root / split / "masks").mkdir(parents=True, exist_ok=True)
        for i in range(count):
            image = np.random.default_rng(i).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
            Image.fromarray(image).save(root / split / "images" / f"{split}_{i}.png")
            Image.fromarray(make_mask(split, i)).save(root / split / "masks" / f"{split}_{i}{mask_ext}",
                                                      **({"quality": 90} if mask_ext == ".jpg" else {}))
    if classes:
        (root / "classes.yaml").write_text(yaml.safe_dump(classes))
    return root


def jpeg_round_trip(mask: np.ndarray) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(mask).save(buffer, format="JPEG", quality=90)
    return np.array(Image.open(io.BytesIO(buffer.getvalue())))


def check(root: Path, tmp_path: Path, *overrides: str):
    return run_cli("data", "check", "dataset=folder", f"dataset.root={root}", *overrides,
                   f"hydra.run.dir={tmp_path / 'check'}", cwd=tmp_path)


def train(root: Path, run_dir: Path, *overrides: str):
    return run_cli("train", "dataset=folder", f"dataset.root={root}", *FOLDER_TINY, *overrides,
                   f"hydra.run.dir={run_dir}", cwd=run_dir.parent)


@pytest.mark.slow
def test_binary_0_255_masks_are_refused_with_the_fix_and_train_two_classes_with_label_map(tmp_path):
    root = write_tree(tmp_path / "data", lambda split, i: disc(i))
    refused = train(root, tmp_path / "refused")
    assert refused.returncode == 1, refused.stdout[-2000:]
    assert "look like binary masks saved as 0/255" in refused.stderr
    assert "dataset.label_map='{255: 1}'" in refused.stderr and "binarize_threshold=127" in refused.stderr
    assert "train_0.png" in refused.stderr and "Traceback" not in refused.stderr
    assert not list((tmp_path / "refused").rglob("*.pt"))

    trained = train(root, tmp_path / "mapped", "dataset.label_map={255: 1}")
    assert trained.returncode == 0, trained.stderr[-3000:]
    from segtrain.utils.checkpoint import load_checkpoint

    assert load_checkpoint(tmp_path / "mapped" / "checkpoints" / "last.pt")["meta"]["classes"] == ["0", "1"]
    semantic = json.loads((tmp_path / "mapped" / "metrics.json").read_text())["semantic"]
    assert set(semantic["per_class"]) == {"0", "1"}
    assert semantic["mIoU"] < 100  # six steps learn little: a perfect score would mean class 1 is gone


@pytest.mark.slow
def test_jpeg_masks_are_refused_naming_the_files_and_accepted_with_binarize_threshold(tmp_path):
    root = write_tree(tmp_path / "data", lambda split, i: disc(i), mask_ext=".jpg")
    refused = check(root, tmp_path)
    assert refused.returncode == 1
    assert "4 JPEG masks (train_0.jpg, train_1.jpg" in refused.stderr
    assert "dataset.binarize_threshold=127" in refused.stderr and "Save the masks as PNG" in refused.stderr

    dataset = FolderDataset(root, "train", binarize_threshold=127)
    assert dataset.meta.classes == ["0", "1"]
    for i in range(4):  # JPEG's ringing stays far from the threshold: exactly the disc
        assert dataset[i][1]["semantic"].numpy().tolist() == (disc(i) > 127).astype(int).tolist()
    png = write_tree(tmp_path / "png", lambda split, i: disc(i, value=200))  # applies to PNG too
    assert FolderDataset(png, "val", binarize_threshold=127)[1][1]["semantic"].unique().tolist() == [0, 1]


@pytest.mark.slow
def test_compression_noise_is_an_error_not_255_classes(tmp_path):
    root = write_tree(tmp_path / "data", lambda split, i: jpeg_round_trip(disc(i)))  # PNGs of JPEG'd masks
    result = check(root, tmp_path)
    assert result.returncode == 1
    assert "compression or interpolation noise" in result.stderr
    assert "dataset.binarize_threshold=127" in result.stderr and "Save masks as PNG" in result.stderr
    assert "train_" in result.stderr  # example files
    assert FolderDataset(root, "train", binarize_threshold=127).meta.classes == ["0", "1"]


def stray_seven(split: str, i: int) -> np.ndarray:
    mask = three_classes(i)
    if (split, i) == ("train", 1):
        mask[0, :2] = 7  # two pixels: classes 3..6 would be empty, 8 counted
    return mask


@pytest.mark.slow
def test_one_stray_value_making_a_gap_is_an_error_naming_the_file(tmp_path):
    root = write_tree(tmp_path / "data", stray_seven)
    result = check(root, tmp_path)
    assert result.returncode == 1
    assert "classes 3, 4, 5, 6 have no pixel" in result.stderr
    assert "value 7 (2 pixels in 1 mask: train_1.png)" in result.stderr
    assert "dataset.label_map='{7: 255}'" in result.stderr and "dataset.num_classes=8" in result.stderr


@pytest.mark.slow
def test_rare_value_is_a_loud_warning_in_data_check_and_train(tmp_path, caplog):
    root = write_tree(tmp_path / "data", stray_seven)
    result = check(root, tmp_path, "dataset.num_classes=8")  # the classes are said: not an error
    assert result.returncode == 0, result.stderr
    assert "WARNING: " in result.stdout and "value 7 (2 pixels in 1 mask: train_1.png)" in result.stdout
    assert "no problems found (1 warning above)" in result.stdout
    with caplog.at_level(logging.WARNING, logger="segtrain.data.datasets.folder"):
        FolderDataset(root, "train", num_classes=8)
    assert "rare label values" in caplog.text and "train_1.png" in caplog.text


@pytest.mark.slow
def test_a_bad_value_in_one_val_mask_fails_before_the_first_step(tmp_path):
    def bad_val(split, i):
        mask = three_classes(i)
        if (split, i) == ("val", 2):
            mask[5, 5] = 9
        return mask

    root = write_tree(tmp_path / "data", bad_val)
    run_dir = tmp_path / "run"
    start = time.monotonic()
    result = train(root, run_dir, "trainer.ckpt_every=1", "trainer.eval_every=0")
    assert time.monotonic() - start < EXIT_WITHIN_S
    assert result.returncode == 1, result.stdout[-2000:]
    assert "val_2.png: label values [9] are outside [0, 3)" in result.stderr
    assert "dataset.label_map" in result.stderr and "Traceback" not in result.stderr
    assert not list(run_dir.rglob("*.pt"))  # ckpt_every=1: any step would have written one


@pytest.mark.slow
def test_classes_yaml_void_value_is_printed_as_the_raw_value_and_255_is_not_void(tmp_path):
    def void_11(split, i):
        mask = three_classes(i)
        mask[:4] = 11  # the void value of this data set, per classes.yaml
        if (split, i) == ("val", 1):
            mask[10, 10] = 255  # not void here: classes.yaml says void is 11
        return mask

    root = write_tree(tmp_path / "data", void_11, names=["a", "b", "c"], ignore_index=11)
    result = check(root, tmp_path)
    assert "void (raw value 11 in the files -> ignore_index=255)" in result.stdout
    assert "void (ignore_index=255)" not in result.stdout
    assert result.returncode == 1
    assert "val_1.png: label values [255] are outside" in result.stderr


def test_label_scan_is_cached_outside_the_dataset_and_reused(tmp_path, cache, monkeypatch):
    import segtrain.data.datasets.folder as folder

    root = write_tree(tmp_path / "data", lambda split, i: three_classes(i))
    before = sorted(p for p in root.rglob("*"))
    reads, real = [], folder.read_label

    def counting_read_label(path, **kwargs):
        reads.append(Path(path).name)
        return real(path, **kwargs)

    monkeypatch.setattr(folder, "read_label", counting_read_label)

    assert FolderDataset(root, "train").meta.classes == ["0", "1", "2"]
    assert sorted(reads) == [f"train_{i}.png" for i in range(4)]  # each mask read once
    reads.clear()
    assert FolderDataset(root, "train").meta.classes == ["0", "1", "2"]
    assert reads == []  # the second construction reads nothing
    assert sorted(p for p in root.rglob("*")) == before  # nothing written into the dataset
    assert list((cache / "label_scan").glob("*.json"))

    mask = root / "train" / "masks" / "train_2.png"
    Image.fromarray(stray_seven("train", 1)).save(mask)  # same size: the mtime tells it changed
    os.utime(mask, ns=(mask.stat().st_atime_ns, mask.stat().st_mtime_ns + 10**9))
    with pytest.raises(ValueError, match="value 7"):
        FolderDataset(root, "train")
    assert reads == ["train_2.png"]

    reads.clear()
    unwritable = tmp_path / "a_file"
    unwritable.write_text("")
    monkeypatch.setenv("SEGTRAIN_CACHE_DIR", str(unwritable))  # cannot hold a cache: skipped
    assert FolderDataset(root, "val").meta.classes == ["0", "1", "2"] and len(reads) == 4

    from segtrain.data.datasets.label_scan import cache_dir

    monkeypatch.delenv("SEGTRAIN_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "segtrain"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "segtrain"
