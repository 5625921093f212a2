"""Mask2Former's set-prediction loss (Cheng et al., 2022): after Hungarian matching, class
cross-entropy over every query (unmatched ones learn "no object", weighted 0.1) and, for matched
pairs, sigmoid BCE and dice on K points chosen by uncertainty importance sampling (K = 112 x 112,
oversampled 3x, 75% of them the most uncertain), weights 2 / 5 / 5, on every decoder layer.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from segtrain.models.mask2former.matcher import HungarianMatcher, ignored_pixels, point_sample
from segtrain.utils.distributed import all_reduce_sum, get_world_size


def uncertain_points(mask_logits: torch.Tensor, num_points: int, oversample: float = 3.0,
                     importance: float = 0.75, generator: torch.Generator | None = None) -> torch.Tensor:
    """(K, h, w) logits -> (K, num_points, 2) points in [0, 1]: `importance` of them the most
    uncertain (|logit| smallest) of `oversample * num_points` random candidates, the rest uniform."""
    count = mask_logits.shape[0]
    candidates = torch.rand(count, int(num_points * oversample), 2, device=mask_logits.device,
                            generator=generator)
    uncertainty = -point_sample(mask_logits, candidates).abs()
    chosen = int(importance * num_points)
    top = uncertainty.topk(chosen, dim=1).indices
    points = torch.gather(candidates, 1, top[..., None].expand(-1, -1, 2))
    rest = torch.rand(count, num_points - chosen, 2, device=mask_logits.device, generator=generator)
    return torch.cat([points, rest], dim=1)


class SetCriterion:
    """`criterion(outputs, targets) -> {"loss_ce", "loss_mask", "loss_dice", and the same with a
    "_<layer>" suffix per entry of outputs["aux_outputs"]}`, each already weighted.

    outputs: "pred_logits" (B, Q, C + 1), "pred_masks" (B, Q, h, w) logits, optional
    "aux_outputs" (a list of such dicts, one per intermediate decoder layer). targets: per image
    "labels" (T,), "masks" (T, H, W) {0, 1}, optional "iscrowd" (T,): crowd segments are not
    matched and their pixels count in no mask loss, optional "ignore" bool (H, W): pixels (VOID,
    ignore_index) that count in no mask loss nor mask cost.
    """

    def __init__(self, num_classes: int, matcher: HungarianMatcher | None = None,
                 no_object_weight: float = 0.1, class_weight: float = 2.0, mask_weight: float = 5.0,
                 dice_weight: float = 5.0, num_points: int = 112 * 112, oversample: float = 3.0,
                 importance: float = 0.75) -> None:
        self.num_classes = num_classes
        self.matcher = matcher or HungarianMatcher(class_weight, mask_weight, dice_weight, num_points)
        self.class_weights = torch.ones(num_classes + 1)
        self.class_weights[-1] = no_object_weight
        self.weights = {"loss_ce": class_weight, "loss_mask": mask_weight, "loss_dice": dice_weight}
        self.num_points, self.oversample, self.importance = num_points, oversample, importance

    def __call__(self, outputs: dict[str, Any], targets: list[dict[str, torch.Tensor]]
                 ) -> dict[str, torch.Tensor]:
        # Normalised by the matched segments of the global batch (at least 1), as the paper:
        # under DDP every rank divides by the same count.
        count = sum(int((~t["iscrowd"].bool()).sum()) if "iscrowd" in t else len(t["labels"])
                    for t in targets)
        num_masks = max(1.0, float(all_reduce_sum(torch.tensor([float(count)]))[0]) / get_world_size())
        losses = self._layer(outputs, targets, num_masks)
        for i, aux in enumerate(outputs.get("aux_outputs", [])):
            losses.update({f"{k}_{i}": v for k, v in self._layer(aux, targets, num_masks).items()})
        return losses

    def _layer(self, outputs: dict[str, torch.Tensor], targets: list[dict[str, torch.Tensor]],
               num_masks: float) -> dict[str, torch.Tensor]:
        logits, masks = outputs["pred_logits"], outputs["pred_masks"]
        matches = self.matcher.match(logits, masks, targets)
        classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        for i, (rows, cols) in enumerate(matches):
            classes[i, rows.to(logits.device)] = targets[i]["labels"][cols.to(targets[i]["labels"].device)]
        loss_ce = F.cross_entropy(logits.float().transpose(1, 2), classes,
                                  self.class_weights.to(logits.device))
        bce, dice = self._mask_losses(masks, targets, matches, num_masks)
        return {"loss_ce": self.weights["loss_ce"] * loss_ce, "loss_mask": self.weights["loss_mask"] * bce,
                "loss_dice": self.weights["loss_dice"] * dice}

    def _mask_losses(self, masks: torch.Tensor, targets: list[dict[str, torch.Tensor]],
                     matches: list[tuple[torch.Tensor, torch.Tensor]], num_masks: float
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        bce = dice = masks.sum() * 0.0  # no match in the batch: zero, still in the graph
        for i, (rows, cols) in enumerate(matches):
            if len(rows) == 0:
                continue
            pred = masks[i, rows.to(masks.device)].float()
            true = targets[i]["masks"][cols.to(targets[i]["masks"].device)].float()
            with torch.no_grad():
                points = uncertain_points(pred, self.num_points, self.oversample, self.importance)
                true_points = point_sample(true, points)
                keep = torch.ones_like(true_points)
                region = ignored_pixels(targets[i])
                if region is not None:
                    keep = (point_sample(region[None].float().expand(len(points), -1, -1), points)
                            < 0.5).float()
            logit_points = point_sample(pred, points)
            per_point = F.binary_cross_entropy_with_logits(logit_points, true_points, reduction="none")
            bce = bce + ((per_point * keep).sum(1) / keep.sum(1).clamp(min=1)).sum()
            probs = logit_points.sigmoid() * keep
            kept_true = true_points * keep
            dice = dice + (1 - (2 * (probs * kept_true).sum(1) + 1)
                           / (probs.sum(1) + kept_true.sum(1) + 1)).sum()
        return bce / num_masks, dice / num_masks
