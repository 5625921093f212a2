"""Panoptic segmentation glue (Panoptic FPN): joint losses, the standard inference merge, PQ."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as nnf
from torchvision.utils import draw_segmentation_masks

from segtrain.data.meta import DatasetMeta
from segtrain.metrics.build import check_evaluator_names
from segtrain.models.panoptic_fpn import SEMANTIC_LOSS
from segtrain.tasks.instance import LOSS_NAMES, InstanceTask, _size


class PanopticTask(InstanceTask):
    """Batches as InstanceTask's (lists; `targets` keep `panoptic`/`segments` for evaluation),
    plus each training target's `semantic` map in the semantic branch's layout (0 = things,
    1..S = meta.stuff_ids in order, ignore_index as is).

    Inference merge (Panoptic FPN's, as detectron2 implements it): instances by descending score
    while score >= `instance_score_thresh`, each dropped when more than `overlap_thresh` of its
    mask is already taken and otherwise keeping its free pixels; then each stuff class of the
    semantic argmax on the still-free pixels, kept when it covers >= `stuff_area_thresh` pixels
    (at the original image size); what is left is VOID (0).
    """

    required_targets = ("boxes", "masks", "labels", "semantic", "panoptic", "segments")
    primary_metric = "panoptic/PQ"
    prediction_keys = ("panoptic", "instances", "sem_seg")
    default_evaluators = ("panoptic", "coco", "semantic")  # PQ, mask/box AP and mIoU in one pass

    def __init__(self, meta: DatasetMeta | Mapping[str, Any], loss_weights: Mapping[str, float] | None = None,
                 mask_threshold: float = 0.5, instance_score_thresh: float = 0.5,
                 overlap_thresh: float = 0.5, stuff_area_thresh: int = 4096,
                 evaluators: Sequence[str] | None = None) -> None:
        if isinstance(meta, Mapping):
            meta = DatasetMeta.from_dict(dict(meta))
        if not meta.thing_ids or not meta.stuff_ids:
            raise ValueError(f"panoptic task: the dataset metadata has thing_ids={meta.thing_ids} and "
                             f"stuff_ids={meta.stuff_ids}; Panoptic FPN needs both (a panoptic dataset)")
        weights = dict(loss_weights or {})
        unknown = sorted(set(weights) - {*LOSS_NAMES, SEMANTIC_LOSS})
        if unknown:
            raise KeyError(f"task.loss_weights has unknown losses {unknown}; expected some of "
                           f"{', '.join((*LOSS_NAMES, SEMANTIC_LOSS))}")
        thresholds = {"mask_threshold": mask_threshold, "instance_score_thresh": instance_score_thresh,
                      "overlap_thresh": overlap_thresh}
        for name, value in thresholds.items():
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"task.{name}={value}; expected a value in [0, 1]")
        self.meta, self.gt_json = meta, None
        self.evaluators = check_evaluator_names(evaluators or self.default_evaluators, self.prediction_keys)
        self.num_classes = len(meta.thing_ids) + 1  # the detector's classes, background included
        self.loss_weights = {name: float(value) for name, value in weights.items()}
        self.mask_threshold, self.instance_score_thresh = float(mask_threshold), float(instance_score_thresh)
        self.overlap_thresh, self.stuff_area_thresh = float(overlap_thresh), int(stuff_area_thresh)
        # Contiguous class -> semantic-branch class; one extra entry maps ignore_index.
        lut = torch.full((meta.num_classes + 1,), meta.ignore_index, dtype=torch.int64)
        lut[meta.thing_ids] = 0
        lut[meta.stuff_ids] = torch.arange(1, len(meta.stuff_ids) + 1)
        self._semantic_lut = lut
        self._thing_classes = torch.tensor(meta.thing_ids, dtype=torch.int64)
        self._stuff_classes = torch.tensor(meta.stuff_ids, dtype=torch.int64)

    def _training_target(self, target: dict[str, Any]) -> dict[str, torch.Tensor]:
        out = super()._training_target(target)
        semantic = target["semantic"].long()
        valid = semantic != self.meta.ignore_index
        if bool(((semantic[valid] < 0) | (semantic[valid] >= self.meta.num_classes)).any()):
            raise ValueError(f"image_id {int(target['image_id'])}: semantic labels "
                             f"{semantic[valid].unique().tolist()} are outside "
                             f"0..{self.meta.num_classes - 1} (ignore {self.meta.ignore_index}); "
                             "check the dataset's classes")
        out["semantic"] = self._semantic_lut[torch.where(valid, semantic, self.meta.num_classes)]
        return out

    def predict(self, model: nn.Module, batch: dict[str, Any]) -> list[dict[str, Any]]:
        """Per image, at its orig_size (segtrain.predictions): "instances" (the detector's, labels
        1 + index in meta.thing_ids), "panoptic" int32 (H, W) segment ids (0 = VOID) with
        "segments" [{id, category_id (contiguous), isthing, score (1 for stuff)}], and "sem_seg"
        int64 (H, W): each segment's class, VOID pixels the best stuff class of the semantic branch.
        """
        outputs = model(self.to_float(batch["images"]))
        return [self.image_prediction(output, image, target)
                for image, target, output in zip(batch["images"], batch["targets"], outputs)]

    def image_prediction(self, output: dict[str, torch.Tensor], image: torch.Tensor,
                         target: dict[str, Any]) -> dict[str, Any]:
        """One image's predictions from the model's output for it (detections with mask
        probabilities and `sem_seg` class scores (S + 1, H, W) at the image's size: logits, or
        probabilities as test-time augmentation averages them)."""
        size = _size(target, image)
        instances = self._postprocess(output, tuple(image.shape[-2:]), size)
        logits = output["sem_seg"].float()
        if tuple(logits.shape[-2:]) != size:  # the loader resized the image: back to its size
            logits = nnf.interpolate(logits[None], size=size, mode="bilinear", align_corners=False)[0]
        panoptic, segments = self._merge(instances, logits)
        return {"instances": instances, "panoptic": panoptic, "segments": segments,
                "sem_seg": self._semantic(panoptic, segments, logits)}

    def _merge(self, instances: dict[str, torch.Tensor], logits: torch.Tensor
               ) -> tuple[torch.Tensor, list[dict[str, Any]]]:
        """The segment-id map and segment list of one image (the merge in the class docstring)."""
        device = logits.device
        panoptic = torch.zeros(logits.shape[-2:], dtype=torch.int32, device=device)
        segments: list[dict[str, Any]] = []
        scores = instances["scores"]
        for i in scores.argsort(descending=True).tolist():
            score = float(scores[i])
            if score < self.instance_score_thresh:
                break
            mask = instances["masks"][i]
            area = int(mask.sum())
            if area == 0:
                continue
            taken = panoptic > 0
            if int((mask & taken).sum()) / area > self.overlap_thresh:
                continue
            panoptic[mask & ~taken] = len(segments) + 1
            category = int(self._thing_classes[int(instances["labels"][i]) - 1])
            segments.append({"id": len(segments) + 1, "category_id": category, "isthing": True,
                             "score": score})
        semantic = logits.argmax(dim=0)
        free = panoptic == 0
        for label in semantic.unique().tolist():
            if label == 0:  # the things class: instances cover it
                continue
            mask = (semantic == label) & free
            if int(mask.sum()) < self.stuff_area_thresh:
                continue
            panoptic[mask] = len(segments) + 1
            segments.append({"id": len(segments) + 1, "category_id": int(self._stuff_classes[label - 1]),
                             "isthing": False, "score": 1.0})
        return panoptic, segments

    def _semantic(self, panoptic: torch.Tensor, segments: list[dict[str, Any]],
                  logits: torch.Tensor) -> torch.Tensor:
        """Class map int64 (H, W): segments' classes; VOID pixels take the best stuff class."""
        stuff = self._stuff_classes.to(logits.device)
        labels = stuff[logits[1:].argmax(dim=0)]
        if segments:
            lut = torch.tensor([0, *(s["category_id"] for s in segments)], device=logits.device)
            labels = torch.where(panoptic > 0, lut[panoptic.long()], labels)
        return labels

    def visualize(self, batch: dict[str, Any], predictions: list[dict[str, Any]],
                  max_images: int = 4) -> torch.Tensor:
        """uint8 (3, rows*H, 3*W) grid: image | predicted segments | ground-truth segments."""
        rows = []
        for i in range(min(max_images, len(predictions))):
            image, target, pred = batch["images"][i].cpu(), batch["targets"][i], predictions[i]
            size = _size(target, image)
            if tuple(image.shape[-2:]) != size:
                image = nnf.interpolate(image[None].float(), size=size, mode="bilinear")[0].round().byte()
            segments = pred["segments"]
            drawn = self._draw_segments(image, pred["panoptic"].cpu(), {
                "ids": torch.tensor([int(seg["id"]) for seg in segments], dtype=torch.int64),
                "classes": torch.tensor([int(seg["category_id"]) for seg in segments], dtype=torch.int64)})
            truth = self._draw_segments(image, target["panoptic"].cpu(), target["segments"])
            rows.append(torch.cat([image, drawn, truth], dim=2))
        width = max(row.shape[2] for row in rows)
        return torch.cat([nnf.pad(row, (0, width - row.shape[2])) for row in rows], dim=1)

    def _draw_segments(self, image: torch.Tensor, panoptic: torch.Tensor,
                       segments: Mapping[str, torch.Tensor]) -> torch.Tensor:
        ids, classes = segments["ids"].cpu(), segments["classes"].cpu()
        if not len(ids):
            return image
        masks = panoptic[None] == ids[:, None, None]
        colours = [tuple(self.meta.palette[int(k)]) for k in classes]
        return draw_segmentation_masks(image, masks, alpha=0.6, colors=colours)
