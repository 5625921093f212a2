"""Test-time augmentation of spatial embeddings (Neven et al.): the network's maps of every pass
brought into the original frame and averaged before the one greedy clustering.

Per pass (scale s, maybe mirrored), in the original frame:
- seeds (sigmoid): mirrored back and resized;
- offsets (tanh, in units of `coord_scale` pixels of the pass's image): divided by s (pixels of
  the original image), mirrored back with the x offset negated (a mirror reverses x);
- sigma (raw; the bandwidth is exp(10 sigma) on squared embedding distances): distances shrink by
  s in the original frame, so the bandwidth grows by s^2: sigma + 2 ln(s) / 10; mirrored back.
Then embeddings = mean offsets + the original pixel grid, and the task's own `cluster`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as nnf

from segtrain.inference.tta import TTAOptions, augmented, restored
from segtrain.models.spatial_embeddings import output_layout
from segtrain.tasks.spatial_embeddings import _SIGMA_SCALE


def averaged_maps(task: Any, model: nn.Module, images: torch.Tensor, options: TTAOptions
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float uint8-range images (N, 3, H, W) -> (embeddings (N, 2, H, W), raw sigma
    (N, n_sigma, H, W), seeds (N, K, H, W)) averaged over the augmentations (module docstring),
    as the task's `_maps` gives them for one plain pass."""
    size = tuple(images.shape[-2:])
    normalized = (images.float() - task.mean.to(images.device)) / task.std.to(images.device)
    offsets = sigma = seeds = None
    augs = options.augmentations()
    for scale, flipped in augs:
        out = model(augmented(normalized, scale, flipped))["out"].float()
        n_sigma, _ = output_layout(out.shape[1], task.num_things)
        parts = restored(torch.cat([torch.tanh(out[:, :2]) / scale, out[:, 2:2 + n_sigma],
                                    torch.sigmoid(out[:, 2 + n_sigma:])], dim=1), size, flipped)
        if flipped:
            parts[:, 0] = -parts[:, 0]
        parts[:, 2:2 + n_sigma] += 2.0 * math.log(scale) / _SIGMA_SCALE
        offsets = parts[:, :2] if offsets is None else offsets.add_(parts[:, :2])
        sigma = parts[:, 2:2 + n_sigma] if sigma is None else sigma.add_(parts[:, 2:2 + n_sigma])
        seeds = parts[:, 2 + n_sigma:] if seeds is None else seeds.add_(parts[:, 2 + n_sigma:])
    height, width = size
    ys = torch.arange(height, device=images.device, dtype=torch.float32) / task.coord_scale
    xs = torch.arange(width, device=images.device, dtype=torch.float32) / task.coord_scale
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"))
    return offsets / len(augs) + grid, sigma / len(augs), seeds / len(augs)


def predict_spatial_embeddings(task: Any, model: nn.Module, batch: dict[str, Any],
                               options: TTAOptions) -> list[dict[str, Any]]:
    """SpatialEmbeddingsTask predictions (segtrain.predictions) with test-time augmentation; one
    image at a time, unpadded (a mirrored padded canvas would move the padding)."""
    from segtrain.metrics.rle import tight_boxes  # pycocotools: not needed for training

    predictions = []
    for i, ((h, w), target) in enumerate(zip(batch["sizes"], batch["targets"])):
        emb, sigma, seeds = averaged_maps(task, model, batch["images"][i:i + 1, :, :h, :w], options)
        masks, labels, scores = task.cluster(emb[0], sigma[0], seeds[0])
        orig = tuple(int(v) for v in target.get("orig_size", (h, w)))
        if orig != (h, w):  # the loader resized the image: back to its original size
            masks = nnf.interpolate(masks[:, None].float(), size=orig, mode="nearest")[:, 0] > 0.5 \
                if len(masks) else masks.new_zeros((0, *orig))
        mask_boxes = tight_boxes(masks)
        predictions.append({"instances": {"masks": masks, "boxes": mask_boxes.float(), "labels": labels,
                                          "scores": scores, "mask_boxes": mask_boxes}})
    return predictions
