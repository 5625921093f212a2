"""Mask2Former glue: one "segments" view of any dataset for training, one forward for every output.

What the model learns is the dataset's choice (`mode`): a semantic dataset gives one segment per
class present, an instance dataset its objects, a panoptic dataset its things and stuff. Crowd
regions and VOID / ignore_index pixels are in no segment and count in no mask loss.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as nnf

from segtrain.data.meta import DatasetMeta
from segtrain.metrics.build import Evaluators, build_evaluators, check_evaluator_names
from segtrain.models.mask2former.inference import panoptic_segments, semantic_scores, top_instances
from segtrain.models.mask2former.model import LOSS_NAMES
from segtrain.tasks.instance import InstanceTask, _plain, _size
from segtrain.tasks.padded_batch import PaddedBatchTask, pad_images
from segtrain.tasks.panoptic import PanopticTask
from segtrain.tasks.semantic import SemanticTask

MODES = ("semantic", "instance", "panoptic")
_REQUIRED = {"semantic": ("semantic",), "instance": ("masks", "labels"), "panoptic": ("panoptic", "segments")}
_PREDICTS = {"semantic": ("sem_seg",), "instance": ("instances",),
             "panoptic": ("panoptic", "instances", "sem_seg")}
_PRIMARY = {"semantic": "semantic/mIoU", "instance": "segm/AP", "panoptic": "panoptic/PQ"}


def _mode_of_target(target: Mapping[str, Any]) -> str:
    """The richest annotation a dataset item carries: panoptic, then instance, then semantic."""
    if "panoptic" in target and "segments" in target:
        return "panoptic"
    if "masks" in target and "labels" in target:
        return "instance"
    if "semantic" in target:
        return "semantic"
    raise ValueError(f"Mask2Former trains on semantic, instance or panoptic targets; this dataset's "
                     f"items have only {sorted(k for k in target if k not in ('image_id', 'orig_size'))}")


class Mask2FormerTask(PaddedBatchTask):
    """Batches: `images` uint8 (N, 3, H, W) padded (bottom/right) to multiples of
    `size_divisibility`; `sizes` each image's (H, W) before padding; `targets` the dataset's
    target dicts (plain tensors, for the evaluators); with annotations `train_targets`: per image
    "labels" int64 (T,) contiguous classes, "masks" bool (T, H, W) on the padded canvas, "ignore"
    bool (H, W) (crowds, VOID, ignore_index and the padding).

    Predictions (segtrain.predictions), by mode: semantic `sem_seg` (the argmax of the paper's
    semantic inference); instance `instances` (top-k query x thing-class pairs); panoptic all
    three, from one forward. Thresholds are the paper's (0.8 / 0.8, top 100).
    """

    mode_of_target = staticmethod(_mode_of_target)  # resolves task.mode=auto (segtrain.builders)

    def __init__(self, meta: DatasetMeta | Mapping[str, Any], mode: str = "auto",
                 mean: Sequence[float] = (123.675, 116.28, 103.53),
                 std: Sequence[float] = (58.395, 57.12, 57.375), size_divisibility: int = 32,
                 object_mask_threshold: float = 0.8, overlap_threshold: float = 0.8,
                 test_topk: int = 100, test_size: Sequence[int] | None = None,
                 loss_weights: Mapping[str, float] | None = None,
                 gt_json: str | None = None, evaluator: str = "coco",
                 evaluators: Sequence[str] | None = None) -> None:
        """`mode` auto is resolved from the dataset by segtrain.builders (train stores the result
        in the run's config); left auto, it is guessed from `meta` (no things: semantic; things
        1..K over a background: instance; else panoptic). `test_size` [short, max_long]: images
        are resized for inference so their short side is `short` unless the long one would pass
        `max_long` (detectron2's ResizeShortestEdge at test time); outputs are at the original size."""
        if isinstance(meta, Mapping):
            meta = DatasetMeta.from_dict(dict(meta))
        mode = guess_mode(meta) if mode == "auto" else mode
        if mode not in MODES:
            raise ValueError(f"task.mode={mode!r}; expected auto or one of {', '.join(MODES)}")
        if mode != "semantic" and not meta.thing_ids:
            raise ValueError(f"task.mode={mode} needs thing classes, but the dataset metadata has "
                             "thing_ids=[]; use task.mode=semantic")
        for name, value in (("object_mask_threshold", object_mask_threshold),
                            ("overlap_threshold", overlap_threshold)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"task.{name}={value}; expected a value in [0, 1]")
        if int(test_topk) < 1 or int(size_divisibility) < 1:
            raise ValueError(f"task.test_topk={test_topk} and task.size_divisibility={size_divisibility} "
                             "must be >= 1")
        unknown = sorted(set(loss_weights or {}) - set(LOSS_NAMES))
        if unknown:
            raise KeyError(f"task.loss_weights has unknown losses {unknown}; expected some of "
                           f"{', '.join(LOSS_NAMES)} (each weighs every decoder layer's term)")
        if test_size is not None and (len(test_size) != 2 or min(int(v) for v in test_size) < 1):
            raise ValueError(f"task.test_size={list(test_size)}; expected null or [short, max_long], "
                             "e.g. [800, 1333]")
        self.test_size = None if test_size is None else (int(test_size[0]), int(test_size[1]))
        # A COCO-format ground truth serves instance evaluation only (panoptic datasets name their
        # panoptic JSON there): otherwise the evaluators build theirs from the targets.
        self.meta, self.mode = meta, mode
        self.gt_json = gt_json if mode == "instance" else None
        self.required_targets = _REQUIRED[mode]
        self.prediction_keys = _PREDICTS[mode]
        self.primary_metric = _PRIMARY[mode]
        defaults = {"semantic": ("semantic",), "instance": (evaluator,),
                    "panoptic": ("panoptic", "coco", "semantic")}[mode]
        self.evaluators = check_evaluator_names(evaluators or defaults, self.prediction_keys)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.size_divisibility = int(size_divisibility)
        self.object_mask_threshold = float(object_mask_threshold)
        self.overlap_threshold = float(overlap_threshold)
        self.test_topk = int(test_topk)
        self.loss_weights = {name: float(value) for name, value in (loss_weights or {}).items()}
        self._thing_lut = torch.tensor([0, *meta.thing_ids], dtype=torch.int64)  # instance label -> class

    # ------------------------------------------------------------------------------ batching
    def collate(self, samples: list[tuple[Any, dict]]) -> dict[str, Any]:
        """Pad images to a common size divisible by `size_divisibility`; segments per image when
        the samples are annotated (not so for `predict`'s new images)."""
        images, sizes = pad_images(samples, self.size_divisibility)
        targets = [_plain(target) for _, target in samples]
        batch = {"images": images, "targets": targets, "sizes": sizes}
        if all(k in t for t in targets for k in self.required_targets):
            canvas = (images.shape[-2], images.shape[-1])
            batch["train_targets"] = [self.segments(t, canvas) for t in targets]
        return batch

    def segments(self, target: Mapping[str, Any], canvas: tuple[int, int]) -> dict[str, torch.Tensor]:
        """The training view of one target on a (H, W) canvas (see the class docstring)."""
        if self.mode == "panoptic":
            panoptic, seg = target["panoptic"], target["segments"]
            crowd = seg["iscrowd"].bool()
            ids = seg["ids"][~crowd]
            masks = panoptic[None] == ids[:, None, None]
            labels = seg["classes"][~crowd]
            ignore = (panoptic == 0) | torch.isin(panoptic, seg["ids"][crowd])
        elif self.mode == "instance":
            labels, masks = target["labels"].long(), target["masks"].bool()
            if len(labels) and not bool(((labels >= 1) & (labels <= len(self.meta.thing_ids))).all()):
                raise ValueError(f"image_id {int(target['image_id'])}: instance labels "
                                 f"{labels.unique().tolist()} are outside 1..{len(self.meta.thing_ids)}")
            crowd = target.get("iscrowd", torch.zeros(len(labels), dtype=torch.int64)).bool()
            ignore = masks[crowd].any(0) if bool(crowd.any()) else masks.new_zeros(masks.shape[-2:])
            masks, labels = masks[~crowd], self._thing_lut[labels[~crowd]]
        else:
            semantic = target["semantic"].long()
            ignore = semantic == self.meta.ignore_index
            labels = semantic[~ignore].unique()
            if len(labels) and int(labels.max()) >= self.meta.num_classes or bool((labels < 0).any()):
                raise ValueError(f"image_id {int(target['image_id'])}: label values {labels.tolist()} "
                                 f"are outside [0, {self.meta.num_classes}) and not "
                                 f"ignore_index={self.meta.ignore_index}; check dataset.num_classes")
            masks = semantic[None] == labels[:, None, None]
        height, width = ignore.shape
        pad = (0, canvas[1] - width, 0, canvas[0] - height)
        return {"labels": labels.long(), "masks": nnf.pad(masks, pad, value=False),
                "ignore": nnf.pad(ignore, pad, value=True)}

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return (images.float() - self.mean.to(images.device)) / self.std.to(images.device)

    # ---------------------------------------------------------------------------- train / eval
    def training_step(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """'loss' (every layer's weighted terms) plus the last layer's loss_ce / loss_mask /
        loss_dice and loss_aux, the earlier layers' sum (the model's own 2/5/5 weights apply,
        `loss_weights` multiply on top)."""
        parts = model(self.normalize(batch["images"]), batch["train_targets"])
        if not isinstance(parts, Mapping):
            raise RuntimeError("Mask2FormerTask.training_step got predictions, not losses: the model "
                               "must be in train mode")
        weighted = {k: v.float() * self.loss_weights.get(k.rsplit("_", 1)[0] if k[-1].isdigit() else k, 1.0)
                    for k, v in parts.items()}
        losses = {k: weighted[k] for k in LOSS_NAMES}
        aux = [v for k, v in weighted.items() if k not in LOSS_NAMES]
        if aux:
            losses["loss_aux"] = torch.stack(aux).sum()
        losses["loss"] = torch.stack(list(weighted.values())).sum()
        return losses

    def predict(self, model: nn.Module, batch: dict[str, Any]) -> list[dict[str, Any]]:
        """Per image, at its original size, the outputs of `mode` (class docstring)."""
        images, sizes = batch["images"], batch["sizes"]
        if self.test_size is not None:
            images, sizes = self._resized(images, sizes)
        outputs = model(self.normalize(images))
        predictions = []
        for i, ((height, width), target) in enumerate(zip(sizes, batch["targets"])):
            masks = nnf.interpolate(outputs["pred_masks"][i : i + 1].float(), size=images.shape[-2:],
                                    mode="bilinear", align_corners=False)[0, :, :height, :width]
            orig = _size(target, batch["images"][i, :, : batch["sizes"][i][0], : batch["sizes"][i][1]])
            if (height, width) != orig:  # the loader resized the image: back to its original size
                masks = nnf.interpolate(masks[None], size=orig, mode="bilinear", align_corners=False)[0]
            predictions.append(self._outputs(outputs["pred_logits"][i].float(), masks))
        return predictions

    def _resized(self, images: torch.Tensor, sizes: list[tuple[int, int]]
                 ) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """The batch with each image resized to `test_size` (bilinear, antialiased) and padded again."""
        short, longest = self.test_size  # type: ignore[misc]
        resized = []
        for image, (h, w) in zip(images, sizes):
            scale = min(short / min(h, w), longest / max(h, w))
            size = (max(1, round(h * scale)), max(1, round(w * scale)))
            resized.append(nnf.interpolate(image[None, :, :h, :w].float(), size=size, mode="bilinear",
                                           align_corners=False, antialias=True)[0].round().clamp(0, 255))
        div = self.size_divisibility
        height = -(-max(r.shape[-2] for r in resized) // div) * div
        width = -(-max(r.shape[-1] for r in resized) // div) * div
        out = images.new_zeros((len(resized), 3, height, width))
        for i, r in enumerate(resized):
            out[i, :, : r.shape[-2], : r.shape[-1]] = r.to(out.dtype)
        return out, [(int(r.shape[-2]), int(r.shape[-1])) for r in resized]

    def _outputs(self, class_logits: torch.Tensor, mask_logits: torch.Tensor) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if "sem_seg" in self.prediction_keys:
            out["sem_seg"] = semantic_scores(class_logits, mask_logits).argmax(0)
        if "instances" in self.prediction_keys:
            found = top_instances(class_logits, mask_logits, self.meta.thing_ids, self.test_topk)
            # Imported here: segtrain.metrics.rle loads pycocotools, which training does not need.
            from segtrain.metrics.rle import tight_boxes

            label_of = torch.zeros(self.meta.num_classes, dtype=torch.int64, device=class_logits.device)
            label_of[self.meta.thing_ids] = torch.arange(1, len(self.meta.thing_ids) + 1,
                                                         device=class_logits.device)
            boxes = tight_boxes(found["masks"])
            out["instances"] = {"masks": found["masks"], "boxes": boxes.float(), "mask_boxes": boxes,
                                "labels": label_of[found["classes"]], "scores": found["scores"]}
        if "panoptic" in self.prediction_keys:
            out["panoptic"], out["segments"] = panoptic_segments(
                class_logits, mask_logits, self.meta.thing_ids, self.object_mask_threshold,
                self.overlap_threshold)
        return out

    def build_evaluator(self, output_dir: str | Path | None = None) -> Evaluators:
        return build_evaluators(self.evaluators, self.meta, output_dir=output_dir, gt_json=self.gt_json)

    # -------------------------------------------------------------------------------- visuals
    def visualize(self, batch: dict[str, Any], predictions: list[dict[str, Any]],
                  max_images: int = 4) -> torch.Tensor:
        """The grid of the task family whose output this mode predicts first (image | prediction |
        ground truth), drawn by that family's own task."""
        view = {"images": self.images(batch), "targets": batch["targets"]}
        if self.mode == "panoptic":
            drawer: Any = PanopticTask(self.meta)
        elif self.mode == "instance":
            drawer = InstanceTask(self.meta.num_classes, self.meta)
        else:
            drawer = SemanticTask(self.meta.num_classes, self.meta.ignore_index, meta=self.meta)
            # SemanticTask reads semantic[i][:h, :w]: the unpadded per-image maps do.
            view = {"images": batch["images"], "sizes": batch["sizes"],
                    "semantic": [t["semantic"] for t in batch["targets"]]}
        return drawer.visualize(view, predictions, max_images)


def guess_mode(meta: DatasetMeta) -> str:
    """The mode `meta` suggests: no thing classes -> semantic; things 1..K beside a background
    class 0 (instance datasets' layout) -> instance; else panoptic."""
    if not meta.thing_ids:
        return "semantic"
    if meta.thing_ids == list(range(1, meta.num_classes)) and meta.stuff_ids in ([0], []):
        return "instance"
    return "panoptic"
