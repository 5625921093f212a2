"""`loss.class_weights=auto`: median-frequency / inverse weights from the training set's pixel
shares, counted once without augmentation, cached outside the data, stored in the run's config."""

from __future__ import annotations

import os

import pytest
import torch
import yaml
from conftest import run_cli

from segtrain.data.datasets.synthetic import SyntheticDataset
from segtrain.losses import CrossEntropyLoss
from segtrain.losses.class_weights import balanced_weights, class_pixel_counts


def test_median_frequency_and_inverse_weights():
    counts = torch.tensor([700, 200, 100, 0])  # shares 0.7, 0.2, 0.1; class 3 absent
    median = balanced_weights(counts, "auto")
    torch.testing.assert_close(median, torch.tensor([0.2 / 0.7, 1.0, 2.0, 0.0]))
    assert torch.equal(balanced_weights(counts, "median_frequency"), median)
    inverse = balanced_weights(counts, "inverse")
    raw = torch.tensor([1 / 0.7, 1 / 0.2, 1 / 0.1])
    torch.testing.assert_close(inverse[:3], raw / raw.mean())
    assert inverse[3] == 0
    with pytest.raises(ValueError, match="no labelled pixel"):
        balanced_weights(torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="median_frequency"):
        balanced_weights(counts, "sqrt")


def test_counts_are_the_untransformed_labels_and_are_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("SEGTRAIN_CACHE_DIR", str(tmp_path / "cache"))
    def crop(image, target):  # an augmentation that would change the shares
        return image, {**target, "semantic": target["semantic"][:2]}

    data = SyntheticDataset(split="train", num_samples=12, image_size=32, num_classes=4, transforms=crop)
    counts = class_pixel_counts(data, 4, 255, "key")
    expected = torch.zeros(4, dtype=torch.int64)
    for i in range(12):
        expected += torch.bincount(data.generate(i)[1]["semantic"].reshape(-1), minlength=4)
    assert torch.equal(counts, expected) and int(counts.sum()) == 12 * 32 * 32
    assert data.transforms is not None  # put back
    assert list((tmp_path / "cache").rglob("*.json")), "cached under SEGTRAIN_CACHE_DIR"

    class Broken(SyntheticDataset):
        def __getitem__(self, index):
            raise AssertionError("read again: the cache was not used")

    again = Broken(split="train", num_samples=12, image_size=32, num_classes=4)
    assert torch.equal(class_pixel_counts(again, 4, 255, "key"), counts)
    spaced = class_pixel_counts(data, 4, 255, "key", max_images=3)  # items 0, 4, 8
    assert int(spaced.sum()) == 3 * 32 * 32


def test_a_string_never_reaches_the_loss_unresolved():
    with pytest.raises(ValueError, match="resolved from the training set"):
        CrossEntropyLoss(class_weights="auto")


@pytest.mark.slow
def test_train_with_auto_weights_stores_them_and_eval_reuses_them(tmp_path):
    env_args = ["dataset.train.num_samples=16", "dataset.val.num_samples=4", "dataset.train.image_size=32",
                "dataset.val.image_size=32", "data.batch_size=4", "data.num_workers=0", "trainer.max_iters=2",
                "trainer.eval_every=2", "trainer.device=cpu", "loss.class_weights=auto"]
    env = {**os.environ, "SEGTRAIN_CACHE_DIR": str(tmp_path / "cache")}
    run = run_cli("train", *env_args, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    log = (tmp_path / "run" / "train.log").read_text()
    assert "class_weights=auto: background" in log and "% of pixels" in log
    stored = yaml.safe_load((tmp_path / "run" / ".hydra" / "config.yaml").read_text())
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    weights = yaml.safe_load(ckpt["config"])["loss"]["class_weights"]
    assert isinstance(weights, list) and len(weights) == 6 and weights[0] < 1 < max(weights)
    assert stored["loss"]["class_weights"] == "auto"  # Hydra's copy: what was asked
    evaluated = run_cli("eval", f"ckpt={tmp_path / 'run' / 'checkpoints' / 'last.pt'}",
                        f"output={tmp_path / 'eval.json'}", cwd=tmp_path, env=env)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
