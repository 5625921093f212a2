"""Test-time augmentation of torchvision Mask R-CNN-style detectors (Mask R-CNN, Mask Scoring
R-CNN, PANet) and Panoptic FPN, as detectron2's GeneralizedRCNNWithTTA does it:

1. every augmentation (scale x flip) runs backbone, RPN and box head; its detections are mapped
   back to the original image frame;
2. all of them are merged by class-wise NMS (the model's own `box_nms_thresh`, at most its
   `box_detections_per_img`);
3. every augmentation runs the mask head on the merged boxes (mapped into its frame); the
   per-box mask probabilities (M x M, flipped back) are averaged and pasted once.

Mask Scoring R-CNN: the MaskIoU head's predicted IoU is averaged over the augmentations too, and
each merged detection's score is its merged class score times that mean (the model's own rule).
Panoptic FPN: the semantic branch's class probabilities of step 1 are averaged at the image size;
the family's usual merge then builds `panoptic` from the augmented instances and semantics.

A scale multiplies the detector's own resize (`min_size`, `max_size`). Only one augmentation's
features are held at a time: step 3 recomputes the backbone (bounded memory, detectron2's choice),
except for the last augmentation of step 1, whose features are reused.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.nn import functional as nnf
from torchvision.models.detection.roi_heads import paste_masks_in_image
from torchvision.models.detection.transform import resize_boxes
from torchvision.ops import batched_nms

from segtrain.inference.tta import TTAOptions
from segtrain.tasks.instance import _size


@contextmanager
def _detector_scale(model: nn.Module, scale: float):
    """The detector's transform resizing to `scale` times its min_size / max_size, restored after."""
    transform = model.transform
    min_size, max_size = transform.min_size, transform.max_size
    if scale != 1.0:
        transform.min_size = tuple(max(1, round(s * scale)) for s in min_size)
        transform.max_size = max(1, round(max_size * scale))
    try:
        yield
    finally:
        transform.min_size, transform.max_size = min_size, max_size


def _features(model: nn.Module, images: list[torch.Tensor], scale: float, flipped: bool):
    """(ImageList, features) of float images in [0, 1] under one augmentation."""
    inputs = [image.flip(-1) for image in images] if flipped else images
    with _detector_scale(model, scale):
        batch, _ = model.transform(inputs)
    return batch, model.backbone(batch.tensors)


def _flip_boxes(boxes: torch.Tensor, width: int) -> torch.Tensor:
    """XYXY boxes mirrored in an image `width` pixels wide."""
    return torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)


def _to_original(boxes: torch.Tensor, resized: tuple[int, int], original: tuple[int, int],
                 flipped: bool) -> torch.Tensor:
    boxes = _flip_boxes(boxes, resized[1]) if flipped else boxes
    return resize_boxes(boxes, resized, original)


def _to_augmented(boxes: torch.Tensor, original: tuple[int, int], resized: tuple[int, int],
                  flipped: bool) -> torch.Tensor:
    boxes = resize_boxes(boxes, original, resized)
    return _flip_boxes(boxes, resized[1]) if flipped else boxes


def _detect(model: nn.Module, batch: Any, features: dict[str, torch.Tensor]):
    """Per image (boxes, scores, labels) of the box branch, in the resized (augmented) frame."""
    heads = model.roi_heads
    proposals, _ = model.rpn(batch, features)
    box_features = heads.box_head(heads.box_roi_pool(features, proposals, batch.image_sizes))
    class_logits, box_regression = heads.box_predictor(box_features)
    return heads.postprocess_detections(class_logits, box_regression, proposals, batch.image_sizes)


def predict_rcnn(task: Any, model: nn.Module, batch: dict[str, Any],
                 options: TTAOptions) -> list[dict[str, Any]]:
    """InstanceTask / PanopticTask predictions (segtrain.predictions) with test-time augmentation
    (the module docstring's three steps)."""
    images = task.to_float(batch["images"])
    sizes = [tuple(image.shape[-2:]) for image in images]
    heads = model.roi_heads
    augs = options.augmentations()
    panoptic = hasattr(model, "semantic_head")
    found: list[list[tuple[torch.Tensor, ...]]] = [[] for _ in images]
    semantic: list[torch.Tensor | None] = [None] * len(images)
    kept = None
    for a, (scale, flipped) in enumerate(augs):
        aug_batch, features = _features(model, images, scale, flipped)
        for i, (boxes, scores, labels) in enumerate(zip(*_detect(model, aug_batch, features))):
            found[i].append((_to_original(boxes, aug_batch.image_sizes[i], sizes[i], flipped),
                             scores, labels))
        if panoptic:
            logits = model.semantic_head(features)
            for i, (h, w) in enumerate(aug_batch.image_sizes):
                probs = _restored_semantic(logits[i:i + 1, :, :h, :w], sizes[i], flipped)
                semantic[i] = probs if semantic[i] is None else semantic[i].add_(probs)
        kept = (aug_batch, features) if a == len(augs) - 1 else None
    merged = [_merge(parts, heads.nms_thresh, heads.detections_per_img) for parts in found]
    mask_sum = [None] * len(images)
    iou_sum = [None] * len(images)
    for a in [len(augs) - 1, *range(len(augs) - 1)]:  # the last one's features are still held
        scale, flipped = augs[a]
        aug_batch, features = kept if a == len(augs) - 1 else _features(model, images, scale, flipped)
        kept = None
        boxes = [_to_augmented(m[0], sizes[i], aug_batch.image_sizes[i], flipped)
                 for i, m in enumerate(merged)]
        masks, ious = _mask_probs(heads, features, boxes, [m[2] for m in merged], aug_batch.image_sizes,
                                  flipped)
        for i in range(len(images)):
            mask_sum[i] = masks[i] if mask_sum[i] is None else mask_sum[i].add_(masks[i])
            if ious is not None:
                iou_sum[i] = ious[i] if iou_sum[i] is None else iou_sum[i].add_(ious[i])
    predictions = []
    for i, (image, target) in enumerate(zip(batch["images"], batch["targets"])):
        boxes, scores, labels = merged[i]
        if iou_sum[i] is not None:  # Mask Scoring R-CNN: class score x mean predicted mask IoU
            scores = scores * (iou_sum[i] / len(augs))
        order = scores.argsort(descending=True)
        probs = mask_sum[i][order] / len(augs)
        output = {"boxes": boxes[order], "scores": scores[order], "labels": labels[order],
                  "masks": paste_masks_in_image(probs[:, None], boxes[order], sizes[i])
                  if len(order) else probs.new_zeros((0, 1, *sizes[i]))}
        if panoptic:
            output["sem_seg"] = semantic[i] / len(augs)
            predictions.append(task.image_prediction(output, image, target))
        else:
            predictions.append({"instances": task._postprocess(output, sizes[i], _size(target, image))})
    return predictions


def _restored_semantic(logits: torch.Tensor, size: tuple[int, int], flipped: bool) -> torch.Tensor:
    """(1, C, h, w) semantic-branch logits of an augmented image -> probabilities (C, H, W) at
    the input image's size, unflipped."""
    logits = nnf.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)
    return (logits.flip(-1) if flipped else logits)[0].softmax(dim=0)


def _merge(parts: list[tuple[torch.Tensor, ...]], nms_thresh: float, max_dets: int
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every augmentation's (boxes, scores, labels) of one image merged by class-wise NMS."""
    boxes = torch.cat([p[0] for p in parts]).float()
    scores = torch.cat([p[1] for p in parts]).float()
    labels = torch.cat([p[2] for p in parts])
    keep = batched_nms(boxes, scores, labels, nms_thresh)[:max_dets]
    return boxes[keep], scores[keep], labels[keep]


def _mask_probs(heads: nn.Module, features: dict[str, torch.Tensor], boxes: list[torch.Tensor],
                labels: list[torch.Tensor], image_sizes: list[tuple[int, int]], flipped: bool
                ) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """Per image, the mask head's probabilities (N, M, M) of each box's class in the original
    (unflipped) box frame; with a MaskIoU head, also its predicted IoUs (N,) in [0, 1]."""
    counts = [len(b) for b in boxes]
    if not sum(counts):
        side = 2 * heads.mask_roi_pool.output_size[0]  # torchvision's mask head doubles the pool size
        empty = [b.new_zeros((0, side, side)) for b in boxes]
        return empty, ([b.new_zeros((0,)) for b in boxes] if hasattr(heads, "maskiou_head") else None)
    roi_features = heads.mask_roi_pool(features, boxes, image_sizes)
    logits = heads.mask_predictor(heads.mask_head(roi_features))
    classes = torch.cat(labels)
    index = torch.arange(len(classes), device=classes.device)
    selected = logits[index, classes]  # (N, M, M)
    ious = None
    if hasattr(heads, "maskiou_head"):  # the IoU head reads the mask in its own (augmented) frame
        ious = heads.maskiou_head(roi_features, selected)[index, classes].float().clamp(0.0, 1.0)
        ious = list(ious.split(counts))
    probs = selected.float().sigmoid()
    if flipped:
        probs = probs.flip(-1)
    return list(probs.split(counts)), ious
