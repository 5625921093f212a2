"""`segtrain data check|show`: dataset validation and summaries, and the sample grid."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from conftest import run_cli
from PIL import Image
from test_data_folder import write_pair, write_tree

from segtrain.data.datasets.synthetic import SyntheticDataset
from segtrain.data.meta import DatasetMeta
from segtrain.data_check import check_split, format_stats, render_sample

SMALL = ["dataset.train.image_size=32", "dataset.val.image_size=32"]


@pytest.fixture(autouse=True)
def label_scan_cache(tmp_path, monkeypatch):
    """The folder dataset's label scan caches under tmp_path (run_cli passes the environment on)."""
    monkeypatch.setenv("SEGTRAIN_CACHE_DIR", str(tmp_path / "cache"))


def _table(stdout: str, split: str) -> dict[str, tuple[float, int]]:
    """The printed rows of one split: class name -> (pixels %, images containing it)."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"{split}: "))
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("  ") or line.startswith("  void"):
            break
        name, percent, images = line.split()[:3]
        rows[name] = (float(percent), int(images))
    return rows


@pytest.mark.slow
def test_check_on_synthetic_prints_pixel_frequencies_equal_to_a_direct_count(tmp_path):
    result = run_cli("data", "check", "dataset=synthetic", "n=5", *SMALL,
                     f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "train: 4096 images (5 checked, 0 problems)" in result.stdout
    assert "val: 256 images (5 checked, 0 problems)" in result.stdout
    for split in ("train", "val"):
        rows = _table(result.stdout, split)
        dataset = SyntheticDataset(split, num_samples=5, image_size=32)
        labels = torch.stack([dataset[i][1]["semantic"] for i in range(5)])
        counts = torch.bincount(labels.flatten(), minlength=dataset.num_classes)
        assert list(rows) == dataset.meta.classes
        assert sum(p for p, _ in rows.values()) == pytest.approx(100.0, abs=0.05)
        for c, name in enumerate(dataset.meta.classes):
            assert rows[name][0] == pytest.approx(100.0 * int(counts[c]) / labels.numel(), abs=0.006)
            assert rows[name][1] == sum(bool((labels[i] == c).any()) for i in range(5))


def test_check_counts_instances_per_image_and_per_class():
    dataset = SyntheticDataset("val", num_samples=6, image_size=32)
    stats = check_split(dataset, "val")
    labels = [dataset[i][1]["labels"] for i in range(6)]
    assert stats.instances == [len(x) for x in labels] and not stats.problems
    assert stats.instances_of.tolist() == torch.bincount(torch.cat(labels), minlength=6).tolist()
    total = sum(len(x) for x in labels)
    assert f"instances per image: mean {total / 6:.2f}, min {min(stats.instances)}" in format_stats(
        stats, dataset.meta)


def test_check_flags_labels_outside_the_classes_and_boxes_outside_the_image():
    class Broken(torch.utils.data.Dataset):
        meta = DatasetMeta(["bg", "a"], [(0, 0, 0), (9, 9, 9)], thing_ids=[1])

        def __len__(self):
            return 2

        def __getitem__(self, i):
            semantic = torch.tensor([[0, 1], [1, 3 if i else 1]])
            target = {"semantic": semantic, "labels": torch.tensor([1]), "image_id": i,
                      "boxes": torch.tensor([[0.0, 0.0, 2.0, 2.0 + 5 * i]])}
            return torch.zeros(3, 2, 2, dtype=torch.uint8), target

    stats = check_split(Broken(), "train")
    assert len(stats.problems) == 2
    assert "train[1]: label values [3] are outside" in stats.problems[0]
    assert "train[1]: 1 boxes lie outside the 2x2 image" in stats.problems[1]


@pytest.mark.slow
def test_check_on_a_folder_tree_reports_each_broken_file_and_exits_1(tmp_path):
    root = write_tree(tmp_path / "data", num_classes=3, size=8)
    write_pair(root, "train", "wrong_size", np.zeros((8, 8), dtype=np.int64), image_size=(8, 9))
    write_pair(root, "val", "bad_label", np.full((8, 8), 9, dtype=np.int64))
    (root / "classes.yaml").write_text(yaml.safe_dump({"names": ["bg", "a", "b"]}))
    result = run_cli("data", "check", "dataset=folder", f"dataset.root={root}",
                     f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    assert "train: 4 images (4 checked, 1 problems)" in result.stdout
    assert "val: 4 images (4 checked, 1 problems)" in result.stdout
    assert "2 problems" in result.stderr
    assert "wrong_size.png is (8, 8)" in result.stderr and "bad_label.png: label values [9]" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_check_of_a_broken_layout_names_the_path(tmp_path):
    root = write_tree(tmp_path / "data")
    (root / "val" / "masks" / "val_0.png").unlink()
    result = run_cli("data", "check", "dataset=folder", f"dataset.root={root}",
                     f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 1
    assert f"{root / 'val' / 'images'}" in result.stderr and "val_0" in result.stderr


@pytest.mark.slow
def test_show_writes_a_grid_of_the_expected_size(tmp_path):
    output = tmp_path / "grid.png"
    result = run_cli("data", "show", "dataset=synthetic_instance", "n=5", "cell_size=32", "split=val",
                     f"output={output}", *SMALL, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert str(output) in result.stdout
    with Image.open(output) as grid:
        # 5 samples -> 3 columns x 2 rows of 32-pixel cells, 2-pixel gaps (make_grid's padding)
        assert grid.size == (3 * 34 + 2, 2 * 34 + 2) and grid.mode == "RGB"


def test_render_blends_the_palette_colour_over_labelled_pixels():
    meta = DatasetMeta(["bg", "thing"], [(0, 0, 0), (200, 100, 0)])
    image = torch.full((3, 4, 4), 100, dtype=torch.uint8)
    semantic = torch.zeros(4, 4, dtype=torch.int64)
    semantic[1, 2] = 1
    semantic[0, 0] = 255  # void: left as it is
    out = render_sample(image, {"semantic": semantic}, meta, alpha=0.5)
    assert out[:, 1, 2].tolist() == [150, 100, 50]
    assert out[:, 0, 0].tolist() == [100, 100, 100]
    assert out[:, 3, 3].tolist() == [50, 50, 50]


@pytest.mark.slow
def test_data_without_an_action_says_which_exist(tmp_path):
    result = run_cli("data", "dataset=synthetic", cwd=tmp_path)
    assert result.returncode == 2
    assert "check, show" in result.stderr
