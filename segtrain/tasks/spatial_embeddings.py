"""Spatial-embeddings glue (Neven et al., CVPR 2019): padded batches with instance targets, the
paper's loss (Lovász hinge on each instance's Gaussian, sigma variance, seed regression) and
the greedy seed clustering that turns the maps into `instances` (segtrain.predictions)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as nnf

from segtrain.data.meta import DatasetMeta
from segtrain.losses.lovasz import lovasz_hinge_per_mask
from segtrain.metrics.build import Evaluators, build_evaluators, check_evaluator_names
from segtrain.models.spatial_embeddings import output_layout
from segtrain.tasks.instance import InstanceTask, _plain
from segtrain.tasks.padded_batch import PaddedBatchTask, pad_images

LOSS_NAMES = ("loss_inst", "loss_var", "loss_seed")
# The official train_config's weights: w_inst 1, w_var 10, w_seed 1.
DEFAULT_WEIGHTS = {"loss_inst": 1.0, "loss_var": 10.0, "loss_seed": 1.0}
_SIGMA_SCALE = 10.0  # the official bandwidth is exp(10 * sigma)
_LN2 = 0.6931471805599453


class SpatialEmbeddingsTask(PaddedBatchTask):
    """Everything the Trainer must not know about spatial embeddings.

    A batch is a dict: `images` uint8 (N, 3, H, W) padded with 0 to the largest image; `sizes`
    each image's (H, W); `targets` the per-image target dicts (plain tensors: `masks` bool
    (n, H_i, W_i), `labels` 1..K, `iscrowd`, `image_id`, `orig_size`, ...), crowds included.
    """

    required_targets = ("masks", "labels")  # target keys a dataset item must have
    primary_metric = "segm/AP"  # what trainer.best_metric=auto selects best.pt by
    prediction_keys = ("instances",)  # what `predict` returns (segtrain.predictions)

    def __init__(
        self,
        num_classes: int,
        meta: DatasetMeta | Mapping[str, Any] | None = None,
        mean: Sequence[float] = (123.675, 116.28, 103.53),
        std: Sequence[float] = (58.395, 57.12, 57.375),
        coord_scale: float = 1024.0,
        to_center: bool = True,
        foreground_weight: float = 10.0,
        loss_weights: Mapping[str, float] | None = None,
        seed_threshold: float = 0.9,
        min_pixels: int = 128,
        score: str = "mean",
        max_instances: int = 100,
        gt_json: str | None = None,
        evaluator: str = "coco",
        evaluators: Sequence[str] | None = None,
    ) -> None:
        """`coord_scale`: pixels per unit of the embedding space (the official 1024: offsets
        reach +-1024 px); `to_center`: each instance's centre is the mean of its pixels'
        coordinates (the official default) rather than of their embeddings; `foreground_weight`
        weighs instance pixels in the seed loss; `loss_weights` the three losses; clustering:
        pixels with seed > 0.5, centres while a seed >= `seed_threshold` is left (the official
        test: 0.9), instances of more than `min_pixels` pixels (at the network's resolution),
        `score` "mean" (mean seed inside the mask) or "seed" (the seed pixel's value, the
        official), at most `max_instances` per image."""
        self._view = InstanceTask(num_classes, meta, gt_json=gt_json, evaluator=evaluator)
        self.num_classes, self.meta = num_classes, self._view.meta
        self.num_things = len(self.meta.thing_ids)
        weights = {**DEFAULT_WEIGHTS, **dict(loss_weights or {})}
        unknown = sorted(set(weights) - set(LOSS_NAMES))
        if unknown:
            raise KeyError(f"task.loss_weights has unknown losses {unknown}; expected some of "
                           f"{', '.join(LOSS_NAMES)}")
        if score not in ("mean", "seed"):
            raise ValueError(f"task.score={score!r}; expected 'mean' or 'seed'")
        if not 0.5 <= seed_threshold < 1.0 or coord_scale <= 0 or min_pixels < 0 or max_instances < 1:
            raise ValueError(f"task.seed_threshold={seed_threshold} (expected in [0.5, 1)), "
                             f"coord_scale={coord_scale} (> 0), min_pixels={min_pixels} (>= 0), "
                             f"max_instances={max_instances} (>= 1)")
        self.loss_weights = {k: float(v) for k, v in weights.items()}
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.coord_scale, self.to_center = float(coord_scale), bool(to_center)
        self.foreground_weight = float(foreground_weight)
        self.seed_threshold, self.min_pixels = float(seed_threshold), int(min_pixels)
        self.score, self.max_instances, self.gt_json = score, int(max_instances), gt_json
        self.evaluators = check_evaluator_names(evaluators or (evaluator,), self.prediction_keys)

    # ------------------------------------------------------------------------------ batching
    def collate(self, samples: list[tuple[Any, dict]]) -> dict[str, Any]:
        """Images padded to the largest (bottom/right, 0); targets kept per image, unpadded."""
        images, sizes = pad_images(samples)
        return {"images": images, "targets": [_plain(t) for _, t in samples], "sizes": sizes}

    def _maps(self, model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Embeddings (N, 2, H, W) = tanh offsets + pixel coordinates (x, y) / coord_scale,
        raw sigma (N, n_sigma, H, W), seeds (N, K, H, W) in [0, 1] (float32) and the
        coordinates (2, H, W)."""
        x = (images.float() - self.mean.to(images.device)) / self.std.to(images.device)
        out = model(x)["out"].float()
        n_sigma, things = output_layout(out.shape[1], self.num_things)
        height, width = out.shape[-2:]
        ys = torch.arange(height, device=out.device, dtype=torch.float32) / self.coord_scale
        xs = torch.arange(width, device=out.device, dtype=torch.float32) / self.coord_scale
        grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"))  # (2, H, W): x, y
        seeds = torch.sigmoid(out[:, 2 + n_sigma:])
        return torch.tanh(out[:, :2]) + grid, out[:, 2: 2 + n_sigma], seeds, grid

    # ---------------------------------------------------------------------------- train / eval
    def training_step(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The paper's loss averaged over images: each weighted part plus 'loss', their sum."""
        emb, sigma, seeds, grid = self._maps(model, batch["images"])
        parts = torch.zeros(3, device=emb.device)
        # float32 even under bf16/fp16 autocast: the centres are means of coordinates (matmuls),
        # which bf16 would round to a few pixels
        with torch.autocast(emb.device.type, enabled=False):
            for i, ((h, w), target) in enumerate(zip(batch["sizes"], batch["targets"])):
                parts = parts + self.image_loss(emb[i, :, :h, :w], sigma[i, :, :h, :w],
                                                seeds[i, :, :h, :w], grid[:, :h, :w], target)
        parts = parts / len(batch["sizes"])
        losses = {name: parts[j] * self.loss_weights[name] for j, name in enumerate(LOSS_NAMES)}
        losses["loss"] = sum(losses.values())
        return losses

    def image_loss(self, emb: torch.Tensor, sigma: torch.Tensor, seeds: torch.Tensor,
                   grid: torch.Tensor, target: dict[str, Any]) -> torch.Tensor:
        """float32 (3,): instance (Lovász hinge), variance and seed losses of one image, each as
        the official SpatialEmbLoss computes it (per-instance means; seed sum over H*W)."""
        masks, labels = target["masks"].bool(), target["labels"].long()
        crowd = target.get("iscrowd")
        valid = torch.ones(emb.shape[1:], dtype=torch.bool, device=emb.device)
        if crowd is not None and len(crowd) and bool(crowd.any()):
            valid &= ~masks[crowd.bool()].any(0)  # crowds teach no seed, as the official code
            masks, labels = masks[~crowd.bool()], labels[~crowd.bool()]
        area = masks.flatten(1).sum(1)
        masks, labels, area = masks[area > 0], labels[area > 0], area[area > 0].float()
        pixels = emb.shape[1] * emb.shape[2]
        fg = masks.flatten(1).float()  # (n, P)
        e, s_raw = emb.reshape(2, -1), sigma.reshape(sigma.shape[0], -1)
        target_seed = torch.zeros_like(seeds.reshape(seeds.shape[0], -1))
        weight = valid.reshape(1, -1).float().expand_as(target_seed).clone()
        inst = var = emb.new_zeros(())
        if len(masks):
            centre = fg @ (grid.reshape(2, -1) if self.to_center else e).t() / area[:, None]  # (n, 2)
            s_mean = fg @ s_raw.t() / area[:, None]  # (n, n_sigma)
            # mean over the instance of (sigma - its mean)^2, from sums: no (n, n_sigma, P) tensor
            held = s_mean.detach()
            spread = fg @ (s_raw * s_raw).t() - 2 * held * (fg @ s_raw.t()) + area[:, None] * held**2
            var = (spread.sum(1) / (area * s_raw.shape[0])).mean()
            bandwidth = torch.exp(_SIGMA_SCALE * s_mean).expand(-1, 2)  # (n, 2)
            dist = ((e[None] - centre[:, :, None]) ** 2 * bandwidth[:, :, None]).sum(1)
            phi = torch.exp(-dist)  # (n, P)
            inst = lovasz_hinge_per_mask(2 * phi - 1, masks.flatten(1)).mean()
            onehot = nnf.one_hot(labels - 1, seeds.shape[0]).float().t()  # (K, n)
            target_seed = (onehot @ (phi.detach() * fg)).clamp(max=1.0)
            weight = weight * (1.0 + (self.foreground_weight - 1.0) * (onehot @ fg).clamp(max=1.0))
        seed = (weight * (seeds.reshape(seeds.shape[0], -1) - target_seed) ** 2).sum() / pixels
        return torch.stack([inst, var, seed])

    @torch.no_grad()
    def predict(self, model: nn.Module, batch: dict[str, Any]) -> list[dict[str, Any]]:
        """Per image {"instances": masks bool (N, H, W) at orig_size, boxes (tight, XYXY),
        labels 1..K, scores, mask_boxes}, best score first (segtrain.predictions)."""
        emb, sigma, seeds, _ = self._maps(model, batch["images"])
        from segtrain.metrics.rle import tight_boxes  # pycocotools: not needed for training

        predictions = []
        for i, ((h, w), target) in enumerate(zip(batch["sizes"], batch["targets"])):
            masks, labels, scores = self.cluster(emb[i, :, :h, :w], sigma[i, :, :h, :w],
                                                 seeds[i, :, :h, :w])
            orig = tuple(int(v) for v in target.get("orig_size", (h, w)))
            if orig != (h, w):  # the loader resized the image: back to its original size
                masks = nnf.interpolate(masks[:, None].float(), size=orig, mode="nearest")[:, 0] > 0.5 \
                    if len(masks) else masks.new_zeros((0, *orig))
            mask_boxes = tight_boxes(masks)
            predictions.append({"instances": {"masks": masks, "boxes": mask_boxes.float(),
                                              "labels": labels, "scores": scores,
                                              "mask_boxes": mask_boxes}})
        return predictions

    def cluster(self, emb: torch.Tensor, sigma: torch.Tensor, seeds: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The official greedy clustering, per thing class: among the pixels whose seed exceeds
        `seed_threshold`, take the highest unclustered seed as a centre with its own bandwidth,
        gather the candidates (seed > 0.5) whose Gaussian exceeds 0.5, keep the proposal when it has
        more than `min_pixels` pixels, mostly unclustered; mark them clustered; repeat while a
        seed above the threshold is left. Returns masks bool (N, H, W), labels (N,), scores (N,)
        best first."""
        height, width = emb.shape[1:]
        found: list[tuple[float, int, torch.Tensor]] = []
        e, s_raw = emb.reshape(2, -1), sigma.reshape(sigma.shape[0], -1)
        for k in range(seeds.shape[0]):
            seed = seeds[k].reshape(-1)
            candidates = (seed > 0.5).nonzero()[:, 0]
            if len(candidates) <= self.min_pixels:
                continue
            ce, cs, cseed = e[:, candidates], s_raw[:, candidates], seed[candidates]
            unclustered = torch.ones(len(candidates), dtype=torch.bool, device=emb.device)
            # Bounded: tiny proposals early in training would otherwise loop once per pixel.
            for _ in range(4 * self.max_instances):
                scored = torch.where(unclustered, cseed, torch.zeros_like(cseed))
                at = int(scored.argmax())
                if float(scored[at]) < self.seed_threshold:
                    break
                bandwidth = torch.exp(_SIGMA_SCALE * cs[:, at]).expand(2)
                # phi > 0.5 <=> its exponent < ln 2: no exp over the candidates
                proposal = (((ce - ce[:, at: at + 1]) ** 2) * bandwidth[:, None]).sum(0) < _LN2
                proposal[at] = True
                size = int(proposal.sum())
                if size > self.min_pixels and 2 * int((proposal & unclustered).sum()) > size:
                    value = float(cseed[proposal].mean()) if self.score == "mean" else float(scored[at])
                    found.append((value, k + 1, candidates[proposal]))
                unclustered &= ~proposal
                if not bool(unclustered.any()):
                    break
        found.sort(key=lambda row: -row[0])
        found = found[: self.max_instances]
        masks = torch.zeros(len(found), height * width, dtype=torch.bool, device=emb.device)
        for j, (_, _, pixels) in enumerate(found):
            masks[j, pixels] = True
        labels = torch.tensor([row[1] for row in found], dtype=torch.int64, device=emb.device)
        scores = torch.tensor([row[0] for row in found], dtype=torch.float32, device=emb.device)
        return masks.view(-1, height, width), labels, scores

    def build_evaluator(self, output_dir: str | Path | None = None) -> Evaluators:
        """The configured evaluators (default: COCO mask and box AP/AR, as Mask R-CNN's)."""
        return build_evaluators(self.evaluators, self.meta, output_dir=output_dir, gt_json=self.gt_json)

    def visualize(self, batch: dict[str, Any], predictions: list[dict[str, Any]],
                  max_images: int = 4) -> torch.Tensor:
        """uint8 grid: image | predictions (score >= 0.5) | ground truth, as Mask R-CNN's."""
        view = {"images": self.images(batch), "targets": batch["targets"]}
        return self._view.visualize(view, predictions, max_images)
