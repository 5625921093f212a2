"""Repeat-factor sampling: LVIS's factors, epochs as a pure function of (seed, epoch), exact
resume through the Trainer, DDP shards, category tables from annotations, config errors."""

from __future__ import annotations

import logging
import math
import os
import signal

import numpy as np
import pytest
import torch
from conftest import TINY, run_cli
from PIL import Image
from test_trainer import ToyTask
from torch import nn
from torch.utils.data import Dataset

from segtrain.builders import check_sampler_config, train_repeat_factors
from segtrain.config_check import ConfigValueError
from segtrain.data.codecs.image_io import write_label
from segtrain.data.datasets.coco import COCOInstanceDataset
from segtrain.data.datasets.folder import FolderDataset
from segtrain.data.datasets.synthetic import SyntheticDataset
from segtrain.data.export.coco import write_coco_instances
from segtrain.data.loader import LoaderOptions, SeededDataset, build_train_loader
from segtrain.data.samplers import RepeatFactorSampler, dataset_image_categories, repeat_factors
from segtrain.engine.trainer import Trainer, TrainerConfig, TrainingInterrupted
from segtrain.utils.checkpoint import load_checkpoint


def test_factors_follow_the_lvis_rule_on_a_hand_made_table():
    # 10 images: category 1 in all, 2 in one, 3 in two; image 9 has no annotation.
    table = [[1, 2], [1, 3], [1, 3, 3], [1], [1], [1], [1], [1], [1], []]
    t = 0.5
    r2, r3 = math.sqrt(t / 0.1), math.sqrt(t / 0.2)
    factors = repeat_factors(table, t)
    # Category 1 is in 9 of 10 images: f = 0.9 > t, so r(1) = 1.
    assert factors.tolist() == pytest.approx([r2, r3, r3, 1, 1, 1, 1, 1, 1, 1])
    assert repeat_factors(table, 0.01).tolist() == [1.0] * 10  # no category below 1% of images


def _sampler(factors, seed=0, rank=0, world=1) -> RepeatFactorSampler:
    sampler = RepeatFactorSampler(torch.tensor(factors, dtype=torch.float64), seed)
    sampler.rank, sampler.world = rank, world
    return sampler


def test_copies_per_epoch_average_the_repeat_factor():
    factors = [1.0, 1.5, 2.3, 3.0, 1.05]
    sampler = _sampler(factors, seed=4)
    epochs = 2000
    counts = torch.zeros(len(factors))
    for epoch in range(epochs):
        order = sampler.epoch_indices(epoch)
        counts += torch.bincount(torch.tensor(order), minlength=len(factors))
        whole = torch.bincount(torch.tensor(order), minlength=len(factors))
        assert all(math.floor(r) <= int(c) <= math.ceil(r) for r, c in zip(factors, whole))
    assert (counts / epochs).tolist() == pytest.approx(factors, abs=0.04)


def test_epoch_list_is_a_pure_function_of_seed_and_epoch():
    factors = [1.0, 2.5, 1.2, 4.0, 1.0, 1.7]
    a, b = _sampler(factors, seed=3), _sampler(factors, seed=3)
    b.set_epoch(5)  # state left from another epoch does not leak
    assert a.epoch_indices(2) == b.epoch_indices(2)
    lists = {tuple(a.epoch_indices(e)) for e in range(6)}
    assert len(lists) == 6  # each epoch its own list (lengths vary too)
    assert a.epoch_indices(2) != _sampler(factors, seed=4).epoch_indices(2)
    for epoch in range(6):
        a.set_epoch(epoch)
        assert len(a) == a.epoch_length(epoch) == len(a.epoch_indices(epoch)) == len(list(a))


def test_ddp_shards_cover_the_epoch_list_with_equal_lengths():
    factors = [1.0, 2.5, 1.2, 4.0, 1.0, 1.7, 3.3]
    whole = _sampler(factors, seed=1)
    whole.set_epoch(3)
    full = list(whole)
    world = 3
    shards = []
    for rank in range(world):
        shard = _sampler(factors, seed=1, rank=rank, world=world)
        shard.set_epoch(3)
        shards.append(list(shard))
        assert len(shards[-1]) == len(shard) == math.ceil(len(full) / world)
    interleaved = [shards[k % world][k // world] for k in range(world * len(shards[0]))]
    # The shards, interleaved, are the single-process list padded by its own first items.
    assert interleaved[: len(full)] == full
    assert interleaved[len(full):] == full[: len(interleaved) - len(full)]


def test_copies_of_an_image_are_augmented_under_their_own_seeds():
    sampler = _sampler([3.0, 1.0], seed=0)
    keys = list(sampler)
    copies = sorted(k for k in keys if k[1] == 0)
    assert [k[2] for k in copies] == [0, 1, 2]

    class Noise(Dataset):
        def __len__(self) -> int:
            return 2

        def __getitem__(self, index: int) -> float:
            return float(torch.rand(()))

    items = SeededDataset(Noise(), seed=0)
    values = [items[key] for key in copies]
    assert len(set(values)) == 3
    assert items[(0, 0, 0)] == items[(0, 0)]  # copy 0 keeps the uniform sampler's seed


class Points(Dataset):
    """x in R^4 and a target; `labels` make index 0 and 1 rare. Noise stands in for augmentation."""

    def __init__(self, n: int = 24) -> None:
        self.x = torch.randn(n, 4, generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.x)

    def image_categories(self) -> list[list[int]]:
        return [[1, 2] if i < 2 else [1] for i in range(len(self))]

    def __getitem__(self, i: int):
        x = self.x[i] + 0.1 * torch.randn(4)
        return i, x, x.sum(dim=0, keepdim=True)


def _collate(samples):
    return {"index": torch.tensor([s[0] for s in samples]), "x": torch.stack([s[1] for s in samples]),
            "y": torch.stack([s[2] for s in samples])}


def _factors(dataset: Points) -> torch.Tensor:
    return repeat_factors(dataset.image_categories(), threshold=0.9)  # r = sqrt(10.8) for images 0, 1


def _epoch_batches(dataset, epoch: int, start: int = 0, num_workers: int = 0) -> list[torch.Tensor]:
    options = LoaderOptions(num_workers=num_workers, persistent_workers=False)
    loader = build_train_loader(dataset, 4, _collate, seed=5, options=options,
                                repeat_factors=_factors(dataset))
    loader.sampler.set_epoch(epoch, start=start)
    return [torch.cat([batch["index"].float(), batch["x"].flatten()]) for batch in loader]


def test_loader_batches_equal_with_0_and_2_workers_and_after_a_mid_epoch_restart():
    dataset = Points()
    full = _epoch_batches(dataset, epoch=1)
    length = RepeatFactorSampler(_factors(dataset), 5).epoch_length(1)
    assert len(full) == length // 4 and length > len(dataset)
    with_workers = _epoch_batches(dataset, epoch=1, num_workers=2)
    assert all(torch.equal(a, b) for a, b in zip(full, with_workers, strict=True))
    resumed = _epoch_batches(dataset, epoch=1, start=3 * 4)
    assert all(torch.equal(a, b) for a, b in zip(full[3:], resumed, strict=True))


class PointTask(ToyTask):
    """test_trainer's task on this file's (index, x, y) samples."""

    collate = staticmethod(_collate)


def _trainer(tmp_path, task=None, seed_model=0, **overrides) -> Trainer:
    torch.manual_seed(seed_model)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.2), nn.ReLU(), nn.Linear(8, 1))
    task = task or PointTask()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    settings = dict(max_iters=None, max_epochs=3, eval_every=0, ckpt_every=0, device="cpu",
                    log_every=0, best_metric=None, keep_last=0, vis_images=0, bn_check=False)
    settings.update(overrides)
    dataset = Points()
    loader = build_train_loader(dataset, 4, task.collate, seed=7, repeat_factors=_factors(dataset))

    def schedule(opt, total):
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / total)

    return Trainer(model, task, optimizer, schedule, loader, None, TrainerConfig.from_dict(settings),
                   tmp_path, checkpoint_extra={"config": "{}", "meta": {}})


def test_max_epochs_counts_each_epochs_own_length(tmp_path):
    trainer = _trainer(tmp_path)
    sampler = trainer.train_loader.sampler
    lengths = [sampler.epoch_length(e) // 4 for e in range(3)]
    assert trainer.total_iters == sum(lengths)
    trainer.fit()
    assert (trainer.state.epoch, trainer.state.batch_in_epoch) == (2, lengths[2])  # ends on epoch 2's last


def test_interrupted_and_resumed_run_repeats_the_uninterrupted_losses(tmp_path):
    reference = _trainer(tmp_path / "ref")
    reference.fit()
    epoch0 = reference.train_loader.sampler.epoch_length(0) // 4
    stop_at = epoch0 + 2  # mid-way through epoch 1

    task = PointTask()
    task.on_step = lambda n: os.kill(os.getpid(), signal.SIGTERM) if n == stop_at else None
    interrupted = _trainer(tmp_path / "run", task=task)
    with pytest.raises(TrainingInterrupted):
        interrupted.fit()
    assert (interrupted.state.epoch, interrupted.state.batch_in_epoch) == (1, 2)

    resumed = _trainer(tmp_path / "run", seed_model=123)
    torch.manual_seed(999)
    resumed.load_state_dict(load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt"))
    resumed.fit()
    assert task.losses[:stop_at] + resumed.task.losses == reference.task.losses
    for p, q in zip(reference.model.parameters(), resumed.model.parameters()):
        assert torch.equal(p, q)


def test_coco_image_categories_come_from_the_json_and_match_the_targets(tmp_path):
    synthetic = SyntheticDataset(split="train", num_samples=6, image_size=(40, 56), num_classes=5, seed=2)
    write_coco_instances(synthetic, tmp_path, split="train")
    coco = COCOInstanceDataset(tmp_path, split="train", filter_empty=False)
    from_json = coco.image_categories()
    coco.image_categories = None  # type: ignore[assignment]  # force the fallback: read targets
    from_targets = dataset_image_categories(coco)
    assert from_json == from_targets and len(from_json) == 6
    assert any(len(cats) > 1 for cats in from_json)


def test_folder_image_categories_come_from_the_label_scan_and_match_the_targets(tmp_path, monkeypatch):
    monkeypatch.setenv("SEGTRAIN_CACHE_DIR", str(tmp_path / "cache"))
    masks = [np.array([[0, 1], [1, 0]]), np.array([[2, 2], [7, 0]]), np.array([[7, 7], [7, 7]])]
    for i, mask in enumerate(masks):
        for folder in ("images", "masks"):
            (tmp_path / "train" / folder).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(tmp_path / "train" / "images" / f"{i}.png")
        write_label(tmp_path / "train" / "masks" / f"{i}.png", mask)
    (tmp_path / "classes.yaml").write_text("names: [a, b, c]\nignore_index: 7\n")
    dataset = FolderDataset(tmp_path, "train", strict=False)
    from_scan = dataset.image_categories()
    assert from_scan == [[0, 1], [0, 2], []]
    dataset.image_categories = None  # type: ignore[assignment]  # force the fallback: read targets
    assert dataset_image_categories(dataset) == from_scan


def test_targets_without_categories_are_a_clear_error():
    class Unlabelled(Dataset):
        def __len__(self) -> int:
            return 2

        def __getitem__(self, index: int):
            return torch.zeros(3, 4, 4), {"depth": torch.zeros(4, 4)}

    with pytest.raises(ValueError, match="data.sampler=repeat_factor needs each image's categories"):
        dataset_image_categories(Unlabelled())


@pytest.mark.parametrize("override, key", [
    ("data.repeat_threshold=0", "data.repeat_threshold=0"),
    ("data.repeat_threshold=1.5", "data.repeat_threshold=1.5"),
    ("data.repeat_threshold=abc", "data.repeat_threshold='abc'"),
    ("data.sampler=balanced", "data.sampler='balanced'"),
])
def test_bad_sampler_values_name_the_key(compose_cfg, override, key):
    cfg = compose_cfg("train", [override])
    with pytest.raises(ConfigValueError, match=key.replace(".", r"\.")):
        check_sampler_config(cfg)


def test_semantic_data_gets_factors_from_its_classes_and_a_logged_summary(compose_cfg, caplog):
    cfg = compose_cfg("train", ["data.sampler=repeat_factor", "data.repeat_threshold=0.9"])
    dataset = SyntheticDataset(split="train", num_samples=12, image_size=32, num_classes=6, seed=1)
    with caplog.at_level(logging.INFO, logger="segtrain"):
        factors = train_repeat_factors(cfg, dataset)
    assert factors is not None and len(factors) == 12 and float(factors.max()) > 1
    assert "images have r > 1" in caplog.text and "epoch 0 holds" in caplog.text
    assert train_repeat_factors(compose_cfg("train", []), dataset) is None


def test_train_command_runs_epochs_of_repeat_factor_sampling(tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli("train", *TINY, "data.sampler=repeat_factor", "data.repeat_threshold=0.9",
                     "trainer.max_iters=null", "trainer.max_epochs=1", "trainer.eval_every=0",
                     f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    log = (run_dir / "train.log").read_text()
    assert "data.sampler=repeat_factor (data.repeat_threshold=0.9)" in log
    assert (run_dir / "checkpoints" / "last.pt").is_file()
