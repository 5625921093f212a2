"""The prediction format every model family returns in eval mode, and helpers to read it.

One dict per image, at the image's original size (`orig_size`), with any of these keys
(detectron2's model outputs are the precedent):

- `sem_seg`: the semantic prediction, either an integer label map (H, W) of contiguous class
  ids (what the adapters return: 8 bytes a pixel instead of 4 * C; 150 classes at 2048x1024
  would be 1.2 GB of float32 scores per image), or float (C, H, W) class probabilities (softmax,
  summing to 1 over C) when scores are asked for. Every consumer reads it through
  `semantic_labels`, which accepts both.
- `instances`: {"masks" bool (N, H, W), "boxes" float32 (N, 4) XYXY in pixels, "scores" float32
  (N,), "labels" int64 (N,) thing labels = 1 + index in `meta.thing_ids` (0 is Mask R-CNN's
  background; for instance datasets, whose thing_ids are 1..K, the label *is* the contiguous
  class id)}; optionally "mask_boxes" int64 (N, 4) x0, y0, x1, y1 (exclusive end) of each mask's
  pixels, which makes RLE encoding read only those windows. Best score first.
- `panoptic`: int32 (H, W) segment ids, 0 = VOID, with `segments`: a list of {"id" int >= 1,
  "category_id" int (contiguous class id), "isthing" bool, "score" float} (stuff scores are 1).

Evaluators, `predict`'s writers, TensorBoard pictures (and later TTA and export) read this
format and nothing else.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from segtrain.data.meta import DatasetMeta

KEYS = ("sem_seg", "instances", "panoptic")
INSTANCE_KEYS = ("masks", "boxes", "scores", "labels")


def semantic_labels(sem_seg: torch.Tensor) -> torch.Tensor:
    """The label map (H, W) int64 of a `sem_seg` prediction: itself when it is one, else the argmax
    of its (C, H, W) scores."""
    if sem_seg.dim() == 3:
        return sem_seg.argmax(dim=0)
    if sem_seg.dim() != 2 or sem_seg.is_floating_point():
        raise ValueError(f"sem_seg is {sem_seg.dtype} {tuple(sem_seg.shape)}; expected an integer "
                         "label map (H, W) or float class scores (C, H, W)")
    return sem_seg.long()


def thing_class(meta: DatasetMeta, label: int) -> int:
    """The contiguous class id of an instance label (1 + index in meta.thing_ids)."""
    if not 1 <= label <= len(meta.thing_ids):
        raise ValueError(f"instance label {label} is outside 1..{len(meta.thing_ids)} "
                         f"(the dataset's {len(meta.thing_ids)} thing classes)")
    return meta.thing_ids[label - 1]


def instance_meta(meta: DatasetMeta) -> DatasetMeta:
    """The metadata of instance labels: class 0 = background, class k = meta.thing_ids[k - 1].

    For an instance dataset (thing_ids 1..K) this equals `meta`; for a panoptic one it drops the
    stuff classes, so COCO results name the right dataset category ids.
    """
    things = list(meta.thing_ids)
    if things == list(range(1, meta.num_classes)):
        return meta
    category_ids = [0, *(meta.category_id(k) for k in things)]
    if category_ids[0] in category_ids[1:]:  # the placeholder must not collide with a real id
        category_ids[0] = min(category_ids[1:]) - 1
    return DatasetMeta(["background", *(meta.classes[k] for k in things)],
                       [(0, 0, 0), *(meta.palette[k] for k in things)], meta.ignore_index,
                       thing_ids=list(range(1, len(things) + 1)), stuff_ids=[0],
                       category_ids=category_ids)


def check_prediction(prediction: Mapping[str, Any], size: Sequence[int]) -> None:
    """Raise ValueError naming what breaks the format for one image of original size (H, W)."""
    height, width = (int(v) for v in size)
    unknown = sorted(set(prediction) - {*KEYS, "segments"})
    if unknown or not set(prediction) & set(KEYS):
        raise ValueError(f"prediction keys {sorted(prediction)}; expected some of {KEYS}")
    if "sem_seg" in prediction:
        labels = semantic_labels(prediction["sem_seg"])
        if tuple(labels.shape) != (height, width):
            raise ValueError(f"sem_seg is {tuple(labels.shape)}; expected the original size "
                             f"{(height, width)}")
    if "instances" in prediction:
        inst = prediction["instances"]
        missing = [k for k in INSTANCE_KEYS if k not in inst]
        if missing:
            raise ValueError(f"instances lack {missing}")
        n = len(inst["scores"])
        if inst["masks"].dtype != torch.bool or tuple(inst["masks"].shape) != (n, height, width):
            raise ValueError(f"instances.masks is {inst['masks'].dtype} {tuple(inst['masks'].shape)}; "
                             f"expected bool {(n, height, width)}")
        if tuple(inst["boxes"].shape) != (n, 4) or tuple(inst["labels"].shape) != (n,):
            raise ValueError("instances.boxes must be (N, 4) and labels (N,)")
    if "panoptic" in prediction:
        ids = prediction["panoptic"]
        if ids.dtype != torch.int32 or tuple(ids.shape) != (height, width):
            raise ValueError(f"panoptic is {ids.dtype} {tuple(ids.shape)}; expected int32 "
                             f"{(height, width)}")
        segments = prediction.get("segments")
        if not isinstance(segments, list):
            raise ValueError("a panoptic prediction needs `segments`, a list of dicts")
        listed = {int(s["id"]) for s in segments}
        present = set(torch.unique(ids).tolist()) - {0}
        if not present <= listed:
            raise ValueError(f"panoptic ids {sorted(present - listed)} are not in segments")
