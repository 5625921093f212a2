"""Mask2Former's bipartite matching of queries to ground-truth segments (Cheng et al., 2022).

Costs per (query, segment): -p(class) * w_class + sigmoid BCE * w_mask + dice * w_dice, the mask
costs on `num_points` random points shared by predictions and targets (not the full masks:
cheaper, and what the paper trains with). `scipy.optimize.linear_sum_assignment` gives the
optimum.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment


def point_sample(masks: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """masks (K, H, W) float; points (K or 1, P, 2) x, y in [0, 1] -> values (K, P), bilinear."""
    grid = (2 * points - 1).expand(masks.shape[0], -1, -1)[:, None]  # (K, 1, P, 2)
    return F.grid_sample(masks[:, None], grid, mode="bilinear", align_corners=False)[:, 0, 0]


def sigmoid_ce_cost(logits: torch.Tensor, targets: torch.Tensor, keep: torch.Tensor | None = None
                    ) -> torch.Tensor:
    """Mean over points of BCE(sigmoid(logit), target) for every (prediction, target) pair:
    logits (Q, P), targets (T, P) in {0, 1} -> (Q, T). `keep` (P,) {0, 1}: the points that count
    (the others are ignored pixels: crowds, VOID)."""
    keep = torch.ones_like(logits[0]) if keep is None else keep
    pos = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits), reduction="none") * keep
    neg = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="none") * keep
    return (pos @ targets.T + neg @ (1 - targets).T) / keep.sum().clamp(min=1)


def dice_cost(logits: torch.Tensor, targets: torch.Tensor, keep: torch.Tensor | None = None
              ) -> torch.Tensor:
    """1 - (2|p t| + 1) / (|p| + |t| + 1) for every pair, p = sigmoid(logits): (Q, P), (T, P) -> (Q, T);
    points where `keep` (P,) is 0 count in neither."""
    probs = logits.sigmoid() if keep is None else logits.sigmoid() * keep
    targets = targets if keep is None else targets * keep
    numerator = 2 * probs @ targets.T
    denominator = probs.sum(-1)[:, None] + targets.sum(-1)[None, :]
    return 1 - (numerator + 1) / (denominator + 1)


def ignored_pixels(target: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """bool (H, W): the target's "ignore" map joined with its crowd segments' masks; None if neither."""
    ignore = target.get("ignore")
    crowd = target.get("iscrowd")
    if crowd is not None and bool(crowd.any()):
        region = target["masks"][crowd.bool().to(target["masks"].device)].bool().any(0)
        ignore = region if ignore is None else ignore.bool() | region
    return None if ignore is None else ignore.bool()


class HungarianMatcher:
    """`match(class_logits, mask_logits, targets)` -> per image (query indices, target indices).

    class_logits (B, Q, C + 1), the last class "no object"; mask_logits (B, Q, h, w); targets a
    list of B dicts with "labels" int64 (T,) and "masks" (T, H, W) {0, 1} at any size, and
    optionally "iscrowd" (T,): crowd segments are never matched, and "ignore" bool (H, W): pixels
    (crowd regions, VOID) that count in no mask cost; crowd masks are ignored pixels too.
    """

    def __init__(self, cost_class: float = 2.0, cost_mask: float = 5.0, cost_dice: float = 5.0,
                 num_points: int = 112 * 112) -> None:
        if min(cost_class, cost_mask, cost_dice) < 0 or not (cost_class or cost_mask or cost_dice):
            raise ValueError("HungarianMatcher: costs must be >= 0 and not all 0")
        self.cost_class, self.cost_mask, self.cost_dice = cost_class, cost_mask, cost_dice
        self.num_points = num_points

    def cost_matrix(self, class_logits: torch.Tensor, mask_logits: torch.Tensor,
                    target: dict[str, torch.Tensor],
                    generator: torch.Generator | None = None) -> torch.Tensor:
        """The (Q, T) costs of one image (class_logits (Q, C + 1), mask_logits (Q, h, w))."""
        labels, masks = target["labels"], target["masks"]
        probs = class_logits.float().softmax(-1)[:, labels]  # (Q, T)
        points = torch.rand(1, self.num_points, 2, device=mask_logits.device, generator=generator)
        pred = point_sample(mask_logits.float(), points)
        true = point_sample(masks.float(), points)
        ignore = target.get("ignore")
        keep = None if ignore is None else (point_sample(ignore[None].float(), points)[0] < 0.5).float()
        return (-self.cost_class * probs + self.cost_mask * sigmoid_ce_cost(pred, true, keep)
                + self.cost_dice * dice_cost(pred, true, keep))

    @torch.no_grad()
    def match(self, class_logits: torch.Tensor, mask_logits: torch.Tensor,
              targets: list[dict[str, torch.Tensor]], generator: torch.Generator | None = None
              ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per image the matched (query indices, target indices), int64 on the CPU, sorted by
        query; target indices refer to the image's full target list (crowds included)."""
        matches = []
        for i, target in enumerate(targets):
            keep = torch.ones(len(target["labels"]), dtype=torch.bool)
            if "iscrowd" in target:
                keep = ~target["iscrowd"].bool().cpu()
            kept = keep.nonzero().flatten()
            if len(kept) == 0:
                empty = torch.empty(0, dtype=torch.int64)
                matches.append((empty, empty))
                continue
            subset = {"labels": target["labels"][kept.to(target["labels"].device)],
                      "masks": target["masks"][kept.to(target["masks"].device)]}
            ignore = ignored_pixels(target)
            if ignore is not None:
                subset["ignore"] = ignore
            cost = self.cost_matrix(class_logits[i], mask_logits[i], subset, generator)
            rows, cols = linear_sum_assignment(cost.cpu().numpy())
            matches.append((torch.as_tensor(rows, dtype=torch.int64), kept[torch.as_tensor(cols)]))
        return matches
