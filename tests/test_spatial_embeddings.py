"""Spatial embeddings: the loss, the clustering, the prediction format and that it learns."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from segtrain.data.datasets.synthetic import SyntheticDataset
from segtrain.losses.lovasz import lovasz_hinge_per_mask
from segtrain.models.spatial_embeddings import build_spatial_embeddings
from segtrain.predictions import check_prediction
from segtrain.tasks.spatial_embeddings import SpatialEmbeddingsTask

SCALE = 128.0  # coord_scale of these tests: 1 unit = 128 px


def _cells(split: str = "val", size: int = 128, num: int = 4) -> SyntheticDataset:
    return SyntheticDataset(split, num, image_size=size, num_classes=3, max_shapes=60, mode="cells")


class _Fixed(nn.Module):
    """A 'model' that returns given raw maps (1, C, H, W) whatever the images."""

    def __init__(self, out: torch.Tensor) -> None:
        super().__init__()
        self.out = nn.Parameter(out)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": self.out.expand(x.shape[0], -1, -1, -1)}


def _perfect(target: dict, n_sigma: int, things: int = 2) -> torch.Tensor:
    """Raw maps of the ideal embedding: every instance pixel's offset points exactly at its
    instance's mean pixel position, sigma is tiny (exp(10 * 2) = 5e8), seeds are 1 on instances
    of their class and 0 elsewhere."""
    masks, labels = target["masks"], target["labels"]
    height, width = masks.shape[1:]
    ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float64),
                            torch.arange(width, dtype=torch.float64), indexing="ij")
    grid = torch.stack([xs, ys]) / SCALE
    offsets = torch.zeros(2, height, width, dtype=torch.float64)
    seeds = torch.full((things, height, width), -30.0, dtype=torch.float64)
    for mask, label in zip(masks, labels):
        centre = grid[:, mask].mean(1, keepdim=True)
        offsets[:, mask] = torch.atanh(centre - grid[:, mask])
        seeds[label - 1, mask] = 30.0
    sigma = torch.full((n_sigma, height, width), 2.0, dtype=torch.float64)
    return torch.cat([offsets, sigma, seeds]).float()[None]


def _task(meta, **kwargs) -> SpatialEmbeddingsTask:
    return SpatialEmbeddingsTask(3, meta, **{"coord_scale": SCALE, "min_pixels": 4, **kwargs})


def test_lovasz_hinge_per_mask_matches_the_reference_formula():
    torch.manual_seed(0)
    logits, labels = torch.randn(3, 50), torch.rand(3, 50) > 0.6
    for row in range(3):
        signs = 2.0 * labels[row].float() - 1.0
        errors = 1.0 - logits[row] * signs
        errors, order = errors.sort(descending=True)
        gt = labels[row].float()[order]
        inter, union = gt.sum() - gt.cumsum(0), gt.sum() + (1 - gt).cumsum(0)
        jaccard = 1.0 - inter / union
        jaccard[1:] = jaccard[1:] - jaccard[:-1]
        expected = torch.dot(errors.relu(), jaccard)
        assert lovasz_hinge_per_mask(logits, labels)[row] == pytest.approx(float(expected), abs=1e-5)


@pytest.mark.parametrize("n_sigma", [1, 2])
def test_loss_is_zero_for_the_perfect_embedding_and_large_for_a_wrong_one(n_sigma):
    ds = _cells()
    image, target = ds[0]
    task = _task(ds.meta)
    batch = task.collate([(image, target)])
    perfect = _perfect(target, n_sigma)
    losses = task.training_step(_Fixed(perfect), batch)
    assert set(losses) == {"loss", "loss_inst", "loss_var", "loss_seed"}
    assert float(losses["loss"].detach()) < 1e-3
    wrong = perfect.clone()
    wrong[:, :2] = 0.0  # every pixel its own centre
    assert float(task.training_step(_Fixed(wrong), batch)["loss_inst"].detach()) > 0.5
    shifted = perfect.clone()
    shifted[:, :2] = torch.tanh(perfect[:, :2]) + 6 / SCALE  # all centres 6 px off
    shifted[:, :2] = torch.atanh(shifted[:, :2].clamp(-0.99, 0.99))
    assert float(task.training_step(_Fixed(shifted), batch)["loss"].detach()) > 0.5


def test_clustering_recovers_the_instances_of_a_perfect_embedding():
    ds = _cells()
    image, target = ds[1]
    task = _task(ds.meta)
    (pred,) = task.predict(_Fixed(_perfect(target, 2)), task.collate([(image, target)]))
    inst = pred["instances"]
    assert len(inst["masks"]) == len(target["masks"]) >= 20
    order = [int(i) for i in torch.argsort(inst["masks"].flatten(1).float().argmax(1))]
    truth = [int(i) for i in torch.argsort(target["masks"].flatten(1).float().argmax(1))]
    assert torch.equal(inst["masks"][order], target["masks"][truth])
    assert torch.equal(inst["labels"][order], target["labels"][truth])
    assert torch.allclose(inst["scores"], torch.ones(len(order)))
    assert torch.equal(inst["boxes"][order], target["boxes"][truth])


def test_predictions_follow_the_contract_at_odd_and_original_sizes():
    ds = _cells(size=64)
    image, target = ds[0]
    task = _task(ds.meta)
    # the loader resized a 96x80 original: masks come back at 96x80
    resized = {**target, "orig_size": torch.tensor([96, 80])}
    (pred,) = task.predict(_Fixed(_perfect(target, 2)), task.collate([(image, resized)]))
    check_prediction(pred, (96, 80))
    assert len(pred["instances"]["masks"]) > 5
    scores = pred["instances"]["scores"]
    assert torch.equal(scores, scores.sort(descending=True).values)
    # a real network on an odd-sized new image (no annotations) and a padded batch
    torch.manual_seed(0)
    model = build_spatial_embeddings(3, base_channels=4, depth=3).eval()
    odd = (image[:, :45, :37], {"image_id": 7, "orig_size": torch.tensor([45, 37])})
    predictions = task.predict(model, task.collate([odd, (image, target)]))
    check_prediction(predictions[0], (45, 37))
    check_prediction(predictions[1], (64, 64))


def test_gradients_reach_every_parameter_and_a_short_training_lowers_the_loss():
    torch.manual_seed(0)
    ds = _cells("train", size=64, num=8)
    model = build_spatial_embeddings(3, n_sigma=1, base_channels=4, depth=3)
    task = _task(ds.meta, foreground_weight=10.0)
    batch = task.collate([ds[0], ds[1]])
    task.training_step(model, batch)["loss"].backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batches = [task.collate([ds[2 * i], ds[2 * i + 1]]) for i in range(4)]
    history = []
    for step in range(40):
        losses = task.training_step(model, batches[step % 4])
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()
        history.append(float(losses["loss"].detach()))
    assert sum(history[-4:]) < 0.7 * sum(history[:4])


def test_a_model_for_another_class_count_is_named():
    ds = _cells()
    task = _task(ds.meta)
    model = build_spatial_embeddings(5, base_channels=4, depth=2)  # 4 seed maps, the data has 2
    with pytest.raises(ValueError, match="thing classes"):
        task.training_step(model, task.collate([ds[0]]))
    with pytest.raises(KeyError, match="loss_weights"):
        _task(ds.meta, loss_weights={"loss_mask": 1.0})


def test_model_and_task_configs_compose(compose_cfg):
    from hydra.utils import instantiate

    from segtrain.builders import build_task

    cfg = compose_cfg("train", ["experiment=synthetic_spatial_embeddings", "dataset.val.num_samples=1"])
    assert cfg.task._target_.endswith("SpatialEmbeddingsTask")
    val = instantiate(cfg.dataset.val)
    task = build_task(cfg, val.meta)
    model = instantiate(cfg.model)
    assert task.evaluators == ["coco"] and task.coord_scale == 128.0
    assert model(torch.zeros(1, 3, 32, 32))["out"].shape == (1, 2 + cfg.model.n_sigma + 2, 32, 32)


@pytest.mark.slow
def test_a_short_training_on_cells_gives_mask_ap():
    """150 steps of batch 4 (~1.5 minutes on one free CPU core): from AP 0 to a clear mask AP."""

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small ops: two contended threads were 4x slower than one
    try:
        _train_and_score()
    finally:
        torch.set_num_threads(threads)


def _train_and_score() -> None:
    from segtrain.data.transforms.presets import instance_train_transforms

    torch.manual_seed(0)
    train = SyntheticDataset("train", 600, num_classes=3, max_shapes=80, mode="cells",
                             transforms=instance_train_transforms(hflip_prob=0.5))
    val = _cells(num=8)
    model = build_spatial_embeddings(3, base_channels=8)
    task = _task(train.meta, min_pixels=8, seed_threshold=0.5)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    for step in range(150):
        losses = task.training_step(model.train(), task.collate([train[4 * step + j] for j in range(4)]))
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()
    evaluator = task.build_evaluator()
    batch = task.collate([val[i] for i in range(len(val))])
    evaluator.process(batch["targets"], task.predict(model.eval(), batch))
    assert evaluator.compute()["segm"]["AP"] > 15.0
