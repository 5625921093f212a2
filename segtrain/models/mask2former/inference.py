"""From one image's query predictions to the three outputs of the prediction format, as the
official Mask2Former's semantic, panoptic and instance inference (MaskFormer's rules).

All functions take `class_logits` (Q, C + 1), the last class "no object", and `mask_logits`
(Q, H, W) already at the size the outputs should have.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def semantic_scores(class_logits: torch.Tensor, mask_logits: torch.Tensor) -> torch.Tensor:
    """(C, H, W): sum over queries of p(class) * sigmoid(mask) (not normalised over classes)."""
    probs = class_logits.float().softmax(-1)[:, :-1]
    return torch.einsum("qc,qhw->chw", probs, mask_logits.float().sigmoid())


def panoptic_segments(class_logits: torch.Tensor, mask_logits: torch.Tensor, thing_classes: Sequence[int],
                      object_mask_threshold: float = 0.8, overlap_threshold: float = 0.8
                      ) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """The paper's merge: queries whose best class is not "no object" and scores above
    `object_mask_threshold` compete per pixel by score * mask probability; a query keeps its
    won pixels (inside its own mask, probability >= 0.5) when they are at least
    `overlap_threshold` of its mask; queries of one stuff class share one segment.

    Returns int32 (H, W) segment ids (0 = VOID) and [{"id", "category_id", "isthing", "score"}].
    """
    scores, labels = class_logits.float().softmax(-1).max(-1)
    num_classes = class_logits.shape[-1] - 1
    keep = (labels != num_classes) & (scores > object_mask_threshold)
    scores, labels, probs = scores[keep], labels[keep], mask_logits[keep].float().sigmoid()
    panoptic = torch.zeros(mask_logits.shape[-2:], dtype=torch.int32, device=mask_logits.device)
    segments: list[dict[str, Any]] = []
    if len(scores) == 0:
        return panoptic, segments
    owner = (scores[:, None, None] * probs).argmax(0)
    things = set(int(k) for k in thing_classes)
    stuff_segment: dict[int, int] = {}
    for k in range(len(scores)):
        label = int(labels[k])
        own = probs[k] >= 0.5
        won = owner == k
        mask = won & own
        own_area, won_area, area = int(own.sum()), int(won.sum()), int(mask.sum())
        if own_area == 0 or won_area == 0 or area == 0 or won_area / own_area < overlap_threshold:
            continue
        isthing = label in things
        if not isthing and label in stuff_segment:
            panoptic[mask] = stuff_segment[label]
            continue
        segment_id = len(segments) + 1
        if not isthing:
            stuff_segment[label] = segment_id
        panoptic[mask] = segment_id
        segments.append({"id": segment_id, "category_id": label, "isthing": isthing,
                         "score": float(scores[k])})
    return panoptic, segments


def top_instances(class_logits: torch.Tensor, mask_logits: torch.Tensor, thing_classes: Sequence[int],
                  topk: int = 100) -> dict[str, torch.Tensor]:
    """The `topk` best (query, thing class) pairs over all queries and classes: "masks" bool
    (N, H, W) = mask logit > 0, "classes" int64 (N,) contiguous ids, "scores" float32 (N,) =
    p(class) times the mean mask probability inside the mask; best score first."""
    probs = class_logits.float().softmax(-1)[:, :-1]
    things = torch.as_tensor(list(thing_classes), dtype=torch.int64, device=probs.device)
    per_pair = probs[:, things].flatten()  # (Q * T,), query-major
    k = min(int(topk), per_pair.numel())
    class_scores, index = per_pair.topk(k)
    queries, classes = index // len(things), things[index % len(things)]
    logits = mask_logits[queries].float()
    masks = logits > 0
    flat = masks.flatten(1).float()
    mask_scores = (logits.sigmoid().flatten(1) * flat).sum(1) / (flat.sum(1) + 1e-6)
    scores = class_scores * mask_scores
    order = scores.argsort(descending=True)
    return {"masks": masks[order], "classes": classes[order], "scores": scores[order]}
