"""Test-time augmentation (`segtrain eval|predict tta=flip|ms3_flip|ms_flip`): a task wrapper whose
`predict` runs the model on flipped and rescaled copies of each image and returns the usual
prediction format (segtrain.predictions) at the original size.

Each model family does what is sound for its outputs: semantic models average class
probabilities (through the task's own `logits`, so sliding-window inference composes); Mask
R-CNN-style detectors merge boxes across augmentations and average the mask head's masks on the
merged boxes (segtrain.inference.tta_rcnn, as detectron2's GeneralizedRCNNWithTTA); Panoptic FPN
does both and merges as usual; Mask2Former averages per query (segtrain.inference.tta_mask2former);
spatial embeddings average their seed, offset and sigma maps in the original frame before
clustering (segtrain.inference.tta_spatial_embeddings).
A family that cannot is refused with an error, never predicted without the augmentation asked for.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.nn import functional as nnf

KEYS = ("flip", "scales")


@dataclass(frozen=True)
class TTAOptions:
    """`flip`: also the horizontal mirror; `scales`: relative image scales (> 0), 1.0 = as usual."""

    flip: bool = False
    scales: tuple[float, ...] = (1.0,)

    @property
    def enabled(self) -> bool:
        return self.flip or self.scales != (1.0,)

    def augmentations(self) -> list[tuple[float, bool]]:
        """(scale, flipped) of every pass, scales in the order given, unflipped first."""
        return [(scale, flipped) for scale in self.scales
                for flipped in ((False, True) if self.flip else (False,))]


def tta_options(node: Mapping[str, Any] | None) -> TTAOptions:
    """The `tta` config node as TTAOptions; ValueError naming the key for an unknown key or a bad
    value (checked before the checkpoint is read)."""
    if node is None:
        return TTAOptions()
    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node, resolve=True)
    node = dict(node)
    unknown = sorted(set(node) - set(KEYS))
    if unknown:
        raise ValueError(f"tta.{unknown[0]}: unknown key; tta has {', '.join(KEYS)} "
                         "(presets: tta=none|flip|ms3_flip|ms_flip)")
    flip = node.get("flip", False)
    if not isinstance(flip, bool):
        raise ValueError(f"tta.flip={flip!r}: expected true or false")
    scales = node.get("scales", [1.0])
    if isinstance(scales, (int, float)) and not isinstance(scales, bool):
        scales = [scales]
    if not isinstance(scales, (list, tuple)) or not scales:
        raise ValueError(f"tta.scales={scales!r}: expected a non-empty list of scales, e.g. [0.75,1.0,1.25]")
    for scale in scales:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
            raise ValueError(f"tta.scales={list(scales)}: {scale!r} is not a scale > 0 "
                             "(relative to the size the model normally sees, e.g. [0.75,1.0,1.25])")
    if len(set(scales)) != len(scales):
        raise ValueError(f"tta.scales={list(scales)}: a scale is listed twice")
    return TTAOptions(flip, tuple(float(s) for s in scales))


class TTATask:
    """`task` with a `predict` that augments; every other attribute is the task's own."""

    def __init__(self, task: Any, options: TTAOptions, predict_fn: Any) -> None:
        self._task, self.options, self._predict = task, options, predict_fn

    def __getattr__(self, name: str) -> Any:
        if name == "_task":  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self._task, name)

    @torch.no_grad()
    def predict(self, model: nn.Module, batch: dict[str, Any]) -> list[dict[str, Any]]:
        return self._predict(self._task, model, batch, self.options)


def with_tta(task: Any, options: TTAOptions) -> Any:
    """`task` itself when TTA is off (predictions unchanged, bit for bit), else a TTATask.
    Raises ValueError for a model family that has no test-time augmentation."""
    if not options.enabled:
        return task
    # Imported here: each family's module imports its task, and the tasks import torchvision.
    from segtrain.tasks.instance import InstanceTask
    from segtrain.tasks.mask2former import Mask2FormerTask
    from segtrain.tasks.semantic import SemanticTask
    from segtrain.tasks.spatial_embeddings import SpatialEmbeddingsTask

    if isinstance(task, SemanticTask):
        return TTATask(task, options, predict_semantic)
    if isinstance(task, InstanceTask):  # Mask R-CNN, MS R-CNN, PANet; PanopticTask derives from it
        from segtrain.inference.tta_rcnn import predict_rcnn

        return TTATask(task, options, predict_rcnn)
    if isinstance(task, Mask2FormerTask):
        from segtrain.inference.tta_mask2former import predict_mask2former

        return TTATask(task, options, predict_mask2former)
    if isinstance(task, SpatialEmbeddingsTask):
        from segtrain.inference.tta_spatial_embeddings import predict_spatial_embeddings

        return TTATask(task, options, predict_spatial_embeddings)
    raise ValueError(
        f"tta={_describe(options)}: the {type(task).__name__} model family has no test-time "
        "augmentation (supported: semantic models, Mask R-CNN / Mask Scoring R-CNN / PANet, Panoptic "
        "FPN, Mask2Former, spatial embeddings); use tta=none")


def _describe(options: TTAOptions) -> str:
    return f"{{flip: {str(options.flip).lower()}, scales: {list(options.scales)}}}"


def scaled_size(height: int, width: int, scale: float) -> tuple[int, int]:
    """(H, W) times `scale`, rounded, at least one pixel."""
    return max(1, round(height * scale)), max(1, round(width * scale))


def augmented(images: torch.Tensor, scale: float, flipped: bool) -> torch.Tensor:
    """float (N, C, H, W) rescaled (bilinear, as MMSegmentation's test resize) and/or mirrored."""
    if scale != 1.0:
        size = scaled_size(images.shape[-2], images.shape[-1], scale)
        images = nnf.interpolate(images, size=size, mode="bilinear", align_corners=False)
    return images.flip(-1) if flipped else images


def restored(scores: torch.Tensor, size: tuple[int, int], flipped: bool) -> torch.Tensor:
    """(N, C, h, w) maps of an augmented input back to the original frame: unflipped, resized
    (bilinear) to `size`."""
    if flipped:
        scores = scores.flip(-1)
    if tuple(scores.shape[-2:]) != tuple(size):
        scores = nnf.interpolate(scores, size=size, mode="bilinear", align_corners=False)
    return scores


def same_size_groups(sizes: list[tuple[int, int]]) -> Iterator[list[int]]:
    """Indices of the batch's images grouped by size, so each group runs as one batch unpadded."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, size in enumerate(sizes):
        groups.setdefault(tuple(size), []).append(i)
    yield from groups.values()


def predict_semantic(task: Any, model: nn.Module, batch: dict[str, Any],
                     options: TTAOptions) -> list[dict[str, Any]]:
    """SemanticTask predictions with TTA: {"sem_seg": int64 (H, W)}, the argmax of
    `semantic_probabilities` (a label map, as the task's own predict)."""
    return [{"sem_seg": probs.argmax(dim=0)} for probs in semantic_probabilities(task, model, batch, options)]


def semantic_probabilities(task: Any, model: nn.Module, batch: dict[str, Any],
                           options: TTAOptions) -> list[torch.Tensor]:
    """Per image of a SemanticTask batch, float (C, H, W) at its original size: the mean over
    augmentations of softmax(logits), each pass resized back (bilinear) and unflipped first.

    `task.logits` runs each pass, so whole or sliding-window inference applies to each augmented
    image. Images of one size run together without padding; one augmentation's probabilities are
    held at a time besides the running sum."""
    out: list[torch.Tensor | None] = [None] * len(batch["sizes"])
    augs = options.augmentations()
    for group in same_size_groups(batch["sizes"]):
        height, width = batch["sizes"][group[0]]
        images = task.normalize(batch["images"][group, :, :height, :width])
        origs = [tuple(int(v) for v in batch["orig_sizes"][i]) for i in group]
        out_size = origs[0] if len(set(origs)) == 1 else (height, width)
        total = None
        for scale, flipped in augs:
            logits = task.logits(model, augmented(images, scale, flipped).contiguous(
                memory_format=task.memory_format))
            probs = restored(logits, out_size, flipped).float().softmax(dim=1)
            total = probs if total is None else total.add_(probs)
        total /= len(augs)
        for j, (i, orig) in enumerate(zip(group, origs)):
            scores = total[j]
            if tuple(scores.shape[-2:]) != orig:  # images of one size, resized from others
                scores = nnf.interpolate(scores[None], size=orig, mode="bilinear", align_corners=False)[0]
            out[i] = scores
    return out  # type: ignore[return-value]
