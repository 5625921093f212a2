"""Instance segmentation glue (Mask R-CNN): list batches, the model's loss dict, masks, visuals."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as nnf
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

from segtrain.data.meta import DatasetMeta, default_palette
from segtrain.metrics.build import Evaluators, build_evaluators, check_evaluator_names
from segtrain.utils.tensors import move_to

# The loss dict of torchvision's Mask R-CNN in train mode.
EVALUATORS = ("coco", "lvis")
LOSS_NAMES = ("loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg")
# Added by Mask Scoring R-CNN's MaskIoU head (model.mask_scoring=true, model=ms_rcnn).
OPTIONAL_LOSS_NAMES = ("loss_maskiou",)
_VIS_SCORE = 0.5  # detections drawn in TensorBoard images


class InstanceTask:
    """Everything the Trainer must not know about instance segmentation.

    A batch is a dict: `images` list of uint8 (3, H_i, W_i); `targets` list of the dataset's
    target dicts (`boxes` float (N, 4) XYXY, `masks` bool (N, H, W), `labels` int64 (N,) in
    1..num_classes-1, `iscrowd` int64 (N,), `image_id` int, `orig_size` int64 [H, W]), crowd
    regions included, for evaluation; `train_targets` the same images' non-crowd instances with
    positive box size (boxes, labels, masks only), for the model's losses.
    """

    required_targets = ("boxes", "masks", "labels")  # target keys a dataset item must have
    primary_metric = "segm/AP"  # what trainer.best_metric=auto selects best.pt by
    prediction_keys = ("instances",)  # what `predict` returns (segtrain.predictions)
    max_dets: tuple[int, ...] = (1, 10, 100)  # COCO's detection caps (AP counts the last)

    def __init__(
        self,
        num_classes: int,
        meta: DatasetMeta | Mapping[str, Any] | None = None,
        loss_weights: Mapping[str, float] | None = None,
        mask_threshold: float = 0.5,
        gt_json: str | None = None,
        evaluator: str = "coco",
        evaluators: Sequence[str] | None = None,
        max_dets: Sequence[int] = (1, 10, 100),
    ) -> None:
        """`num_classes` counts the background; `meta` gives class names, colours and dataset
        category ids (generic names when None); `loss_weights` multiplies named parts of the
        model's loss dict (others weigh 1); `gt_json` is COCO-format ground truth for the
        evaluator (None: built from the batches' targets); `evaluator` is "coco" or "lvis" (LVIS's
        federated rules, which need `gt_json`); `evaluators` the evaluators to run (None: that
        one); `max_dets` COCO's three detection caps (AP counts the last; AR keys follow them)."""
        if isinstance(meta, Mapping):
            meta = DatasetMeta.from_dict(dict(meta))
        if meta is None:
            names = ["background", *(f"class_{i}" for i in range(1, num_classes))]
            meta = DatasetMeta(names, default_palette(num_classes), thing_ids=list(range(1, num_classes)),
                               stuff_ids=[0])
        if meta.num_classes != num_classes:
            raise ValueError(f"task.num_classes={num_classes} but the dataset metadata names "
                             f"{meta.num_classes} classes; they must agree (background included)")
        weights = dict(loss_weights or {})
        unknown = sorted(set(weights) - {*LOSS_NAMES, *OPTIONAL_LOSS_NAMES})
        if unknown:
            raise KeyError(f"task.loss_weights has unknown losses {unknown}; expected some of "
                           f"{', '.join((*LOSS_NAMES, *OPTIONAL_LOSS_NAMES))}")
        if evaluator not in EVALUATORS:
            raise ValueError(f"task.evaluator={evaluator!r}; expected one of {', '.join(EVALUATORS)}")
        if evaluator == "lvis" and gt_json is None:
            raise ValueError("task.evaluator=lvis needs the LVIS JSON: set dataset.gt_json")
        if not 0.0 < mask_threshold < 1.0:
            raise ValueError(f"task.mask_threshold={mask_threshold}; expected a probability in (0, 1)")
        self.num_classes, self.meta = num_classes, meta
        self.loss_weights = {name: float(value) for name, value in weights.items()}
        self.mask_threshold, self.gt_json = float(mask_threshold), gt_json
        self.evaluator = evaluator
        self.evaluators = check_evaluator_names(evaluators or (evaluator,), self.prediction_keys)
        self.max_dets = tuple(int(m) for m in max_dets)
        if len(self.max_dets) != 3 or list(self.max_dets) != sorted(self.max_dets) or self.max_dets[0] < 1:
            raise ValueError(f"task.max_dets={list(max_dets)}; expected three increasing caps as COCO's "
                             "[1, 10, 100] (dense images: [1, 100, 1000])")

    # ------------------------------------------------------------------------------ batching
    def collate(self, samples: list[tuple[Any, dict]]) -> dict[str, Any]:
        """Lists, no padding: the model batches (and resizes) images itself."""
        images = [torch.as_tensor(image).as_subclass(torch.Tensor) for image, _ in samples]
        targets = [_plain(target) for _, target in samples]
        batch = {"images": images, "targets": targets}
        if all(k in t for t in targets for k in self.required_targets):  # not so for `predict`'s images
            batch["train_targets"] = [self._training_target(t) for t in targets]
        return batch

    def _training_target(self, target: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Non-crowd instances with a positive box size. torchvision's Mask R-CNN knows no crowd
        flag (it would learn crowd regions as objects; detectron2 drops them too) and rejects
        degenerate boxes. Filtered here, in the loader workers, so training pays no device sync;
        when nothing is dropped the tensors are shared with `targets`, not copied."""
        boxes, labels, masks = target["boxes"].float().reshape(-1, 4), target["labels"], target["masks"]
        if len(labels) and not bool(((labels >= 1) & (labels < self.num_classes)).all()):
            raise ValueError(
                f"image_id {int(target['image_id'])}: instance labels {labels.unique().tolist()} "
                f"are outside 1..{self.num_classes - 1}; check dataset.num_classes"
            )
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        if "iscrowd" in target:
            keep &= target["iscrowd"] == 0
        if bool(keep.all()):
            return {"boxes": boxes, "labels": labels.long(), "masks": masks}
        return {"boxes": boxes[keep], "labels": labels[keep].long(), "masks": masks[keep]}

    def to_device(self, batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
        """Every tensor moved once, even when `targets` and `train_targets` share it."""
        return move_to(batch, device, non_blocking=device.type == "cuda")

    @staticmethod
    def images(batch: dict[str, Any]) -> list[torch.Tensor]:
        """Each image of a batch, uint8 (3, H, W) (for prediction writers)."""
        return list(batch["images"])

    @staticmethod
    def batch_size(batch: dict[str, Any]) -> int:
        return len(batch["images"])

    @staticmethod
    def to_float(images: list[torch.Tensor]) -> list[torch.Tensor]:
        """uint8 (3, H, W) -> float32 in [0, 1]; the model's transform normalises and resizes."""
        return [image.float().div_(255.0) for image in images]

    # ---------------------------------------------------------------------------- train / eval
    def training_step(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The model's losses, each times its weight, plus 'loss' = their sum (float32)."""
        parts = model(self.to_float(batch["images"]), batch["train_targets"])
        if not isinstance(parts, Mapping):
            raise RuntimeError("InstanceTask.training_step got detections, not a loss dict: the "
                               "model must be in train mode (Mask R-CNN predicts in eval mode)")
        losses = {name: value.float() * self.loss_weights.get(name, 1.0) for name, value in parts.items()}
        losses["loss"] = torch.stack(list(losses.values())).sum()
        return losses

    def predict(self, model: nn.Module, batch: dict[str, Any]) -> list[dict[str, Any]]:
        """Per image {"instances": {"masks" bool (N, H, W) at the target's orig_size, "boxes"
        float32 (N, 4) XYXY in orig_size pixels, "labels" int64 (N,), "scores" float32 (N,),
        "mask_boxes" int64 (N, 4)}} (segtrain.predictions), best score first."""
        outputs = model(self.to_float(batch["images"]))
        return [{"instances": self._postprocess(output, tuple(image.shape[-2:]), _size(target, image))}
                for image, target, output in zip(batch["images"], batch["targets"], outputs)]

    def _postprocess(self, output: dict[str, torch.Tensor], size: tuple[int, int],
                     orig: tuple[int, int]) -> dict[str, torch.Tensor]:
        """Threshold the pasted mask probabilities; rescale to orig_size when the loader resized."""
        probs, boxes = output["masks"].float()[:, 0], output["boxes"].float()
        if size != orig:
            if len(probs):
                probs = nnf.interpolate(probs[:, None], size=orig, mode="bilinear",
                                        align_corners=False)[:, 0]
            else:
                probs = probs.new_zeros((0, *orig))
            scale = boxes.new_tensor([orig[1] / size[1], orig[0] / size[0]] * 2)
            boxes = boxes * scale
        # Imported here: segtrain.metrics.rle loads pycocotools, which training does not need.
        from segtrain.metrics.rle import tight_boxes

        masks = probs > self.mask_threshold
        # Computed here, on the model's device, where it is cheap; RLE encoding then reads only these.
        return {"masks": masks, "boxes": boxes, "labels": output["labels"].long(),
                "scores": output["scores"].float(), "mask_boxes": tight_boxes(masks)}

    def build_evaluator(self, output_dir: str | Path | None = None) -> Evaluators:
        """The configured evaluators (default: COCO's or LVIS's mask and box AP/AR, areas from the
        masks as detectron2). With `output_dir`, the detections are also written there as a
        standard results JSON (`coco_instances_results.json` / `lvis_instances_results.json`)."""
        return build_evaluators(self.evaluators, self.meta, output_dir=output_dir, gt_json=self.gt_json,
                                max_dets=self.max_dets)

    # -------------------------------------------------------------------------------- visuals
    def visualize(self, batch: dict[str, Any], predictions: list[dict[str, torch.Tensor]],
                  max_images: int = 4) -> torch.Tensor:
        """uint8 (3, rows*H, 3*W) grid: image | predictions (score >= 0.5) | ground truth."""
        rows = []
        for i in range(min(max_images, len(predictions))):
            image, target, pred = batch["images"][i].cpu(), batch["targets"][i], predictions[i]
            size = _size(target, image)
            image = nnf.interpolate(image[None].float(), size=size, mode="bilinear")[0].round().byte() \
                if tuple(image.shape[-2:]) != size else image
            instances = pred["instances"]
            keep = instances["scores"].cpu() >= _VIS_SCORE
            drawn = self._draw(image, instances["masks"].cpu()[keep], instances["boxes"].cpu()[keep],
                               instances["labels"].cpu()[keep])
            truth = self._draw(image, target["masks"].cpu().bool(), target["boxes"].cpu().float(),
                               target["labels"].cpu())
            rows.append(torch.cat([image, drawn, truth], dim=2))
        height = max(row.shape[1] for row in rows)
        width = max(row.shape[2] for row in rows)
        return torch.cat([nnf.pad(row, (0, width - row.shape[2], 0, height - row.shape[1]))
                          for row in rows], dim=1)

    def _draw(self, image: torch.Tensor, masks: torch.Tensor, boxes: torch.Tensor,
              labels: torch.Tensor) -> torch.Tensor:
        if not len(labels):
            return image
        colours = [tuple(self.meta.palette[int(k) % self.num_classes]) for k in labels]
        names = [self.meta.classes[int(k)] if 0 <= int(k) < self.num_classes else str(int(k))
                 for k in labels]
        out = draw_segmentation_masks(image, masks, alpha=0.5, colors=colours)
        return draw_bounding_boxes(out, boxes, labels=names, colors=colours)


def _plain(target: dict[str, Any]) -> dict[str, Any]:
    """The target with tv_tensors turned into plain tensors (the model does its own geometry)."""
    return {key: value.as_subclass(torch.Tensor) if torch.is_tensor(value) else value
            for key, value in target.items()}


def _size(target: dict[str, Any], image: torch.Tensor) -> tuple[int, int]:
    """The original (H, W) of an image: its target's orig_size, else the image's own size."""
    if "orig_size" in target:
        height, width = (int(v) for v in target["orig_size"])
        return height, width
    return int(image.shape[-2]), int(image.shape[-1])
