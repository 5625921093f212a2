"""Semantic segmentation glue: batching, normalisation, losses, whole/sliding inference, visuals."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as nnf

from segtrain.data.meta import DatasetMeta, default_palette
from segtrain.metrics.build import Evaluators, build_evaluators, check_evaluator_names
from segtrain.predictions import semantic_labels
from segtrain.utils.tensors import move_to


class SemanticTask:
    """Everything the Trainer must not know about semantic segmentation.

    A batch is a dict: `images` uint8 (N, 3, H, W) and `semantic` int64 (N, H, W) (ignore_index
    for void and padding), both padded to the largest image; `sizes` each image's (H, W) before
    padding; `orig_sizes` int64 (N, 2); `image_ids` list[int]; `targets` the per-image target
    dicts the evaluators read (`semantic` a view of the unpadded part, plus the dataset's
    image_id, orig_size, file_name).
    """

    required_targets = ("semantic",)  # target keys a dataset item must have
    primary_metric = "semantic/mIoU"  # what trainer.best_metric=auto selects best.pt by
    default_evaluators = ("semantic",)
    prediction_keys = ("sem_seg",)  # what `predict` returns (segtrain.predictions)

    def __init__(
        self,
        num_classes: int,
        ignore_index: int = 255,
        loss: nn.Module | None = None,
        aux_weight: float = 0.4,
        mean: Sequence[float] = (123.675, 116.28, 103.53),
        std: Sequence[float] = (58.395, 57.12, 57.375),
        channels_last: bool = False,
        inference: dict[str, Any] | None = None,
        class_names: list[str] | None = None,
        palette: list[Sequence[int]] | None = None,
        meta: DatasetMeta | None = None,
        evaluators: Sequence[str] | None = None,
    ) -> None:
        """`meta` names the classes (else `class_names`/`palette`, else generic names);
        `evaluators` the evaluators to run (None: `default_evaluators`)."""
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.loss, self.aux_weight = loss, aux_weight
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        inference = dict(inference or {})
        self.inference_mode = inference.get("mode", "whole")
        self.crop_size = _pair(inference.get("crop_size"))
        self.stride = _pair(inference.get("stride")) or self.crop_size
        if self.inference_mode not in ("whole", "slide"):
            raise ValueError(
                f"task.inference.mode={self.inference_mode!r}; expected 'whole' or 'slide'"
            )
        if self.inference_mode == "slide" and self.crop_size is None:
            raise ValueError("task.inference.mode=slide needs task.inference.crop_size=[h,w]")
        if meta is None:
            names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
            meta = DatasetMeta(names, list(palette) if palette is not None else default_palette(len(names)),
                               ignore_index, stuff_ids=list(range(len(names))))
        if meta.num_classes != num_classes:
            raise ValueError(f"task.num_classes={num_classes} but the dataset metadata names "
                             f"{meta.num_classes} classes ({meta.classes[:4]}...); they must agree")
        self.meta = meta
        self.class_names, self.palette = meta.classes, palette if palette is not None else meta.palette
        self.evaluators = check_evaluator_names(evaluators or self.default_evaluators,
                                                self.prediction_keys)

    # ------------------------------------------------------------------------------ batching
    def collate(self, samples: list[tuple[Any, dict]]) -> dict[str, Any]:
        """Stack samples, padding to the largest size (image with 0, mask with ignore_index).

        Samples without a `semantic` target (new images for `predict`) get ignore everywhere.
        """
        height = max(image.shape[-2] for image, _ in samples)
        width = max(image.shape[-1] for image, _ in samples)
        images = torch.zeros(len(samples), 3, height, width, dtype=torch.uint8)
        semantic = torch.full((len(samples), height, width), self.ignore_index, dtype=torch.int64)
        for i, (image, target) in enumerate(samples):
            h, w = image.shape[-2:]
            images[i, :, :h, :w] = image
            if "semantic" in target:
                semantic[i, :h, :w] = self._checked_labels(target)
        batch = {
            "images": images,
            "semantic": semantic,
            "sizes": [(int(image.shape[-2]), int(image.shape[-1])) for image, _ in samples],
            "image_ids": [int(t["image_id"]) for _, t in samples],
            "orig_sizes": torch.stack([torch.as_tensor(t["orig_size"]) for _, t in samples]),
            "info": [{k: v for k, v in t.items() if k != "semantic"} for _, t in samples],
            "labelled": ["semantic" in t for _, t in samples],
        }
        batch["targets"] = _per_image_targets(batch)
        return batch

    def _checked_labels(self, target: dict) -> torch.Tensor:
        """The target's label map; values outside [0, C) other than ignore_index are an error.

        Checked here, on the loader's side, so that training pays no device sync for it.
        """
        labels = target["semantic"]
        bad = ((labels < 0) | (labels >= self.num_classes)) & (labels != self.ignore_index)
        if bad.any():
            values = torch.unique(labels[bad]).tolist()[:8]
            raise ValueError(
                f"image_id {int(target['image_id'])}: label values {values} are outside "
                f"[0, {self.num_classes}) and not ignore_index={self.ignore_index}; check "
                "dataset.num_classes, dataset.ignore_index or the dataset's label mapping"
            )
        return labels

    def to_device(self, batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
        """Tensors moved; `targets` rebuilt as views of the moved label maps."""
        moved = move_to({k: v for k, v in batch.items() if k != "targets"}, device,
                        non_blocking=device.type == "cuda")
        if "info" in moved:
            moved["targets"] = _per_image_targets(moved)
        return moved

    def images(self, batch: dict[str, Any]) -> list[torch.Tensor]:
        """Each image of a batch, uint8 (3, H, W), without its padding (for prediction writers)."""
        return [image[:, :height, :width] for image, (height, width) in zip(batch["images"], batch["sizes"])]

    @staticmethod
    def batch_size(batch: dict[str, Any]) -> int:
        return batch["images"].shape[0]

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, H, W) -> float32 normalised, on the images' device."""
        mean, std = self.mean.to(images.device), self.std.to(images.device)
        out = (images.float() - mean) / std
        return out.contiguous(memory_format=self.memory_format)

    # ---------------------------------------------------------------------------- train / eval
    def training_step(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Losses of one batch: 'loss' (the total) plus each part."""
        if self.loss is None:
            raise ValueError("SemanticTask needs a loss to train; pass loss=...")
        outputs = model(self.normalize(batch["images"]))
        target = batch["semantic"]
        if outputs["out"].shape[1] != self.num_classes:
            raise ValueError(
                f"the model predicts {outputs['out'].shape[1]} classes but the task has "
                f"{self.num_classes} (dataset.num_classes); the model's num_classes must follow "
                "the dataset's"
            )
        losses = {"loss_seg": self.loss(outputs["out"], target)}
        # A combined loss (e.g. ce_dice) exposes its terms; log each one, unweighted.
        for name, value in (getattr(self.loss, "last_parts", None) or {}).items():
            losses[f"loss_seg_{name}"] = value
        if "aux" in outputs and self.aux_weight > 0:
            losses["loss_aux"] = self.aux_weight * self.loss(outputs["aux"], target)
        losses["loss"] = losses["loss_seg"] + losses.get("loss_aux", 0.0)
        return losses

    def logits(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """Class scores (N, C, H, W) float32 for normalised images, whole or sliding-window."""
        if self.inference_mode == "whole":
            return model(images)["out"].float()
        return self._slide_logits(model, images)

    def _slide_logits(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """Average logits of overlapping crop_size windows at `stride` (MMSegmentation's slide)."""
        (crop_h, crop_w), (stride_h, stride_w) = self.crop_size, self.stride
        n, _, height, width = images.shape
        rows = max(-(-(height - crop_h) // stride_h), 0) + 1
        cols = max(-(-(width - crop_w) // stride_w), 0) + 1
        scores = images.new_zeros((n, self.num_classes, height, width), dtype=torch.float32)
        counts = images.new_zeros((1, 1, height, width), dtype=torch.float32)
        for row in range(rows):
            for col in range(cols):
                y1 = max(min(row * stride_h, height - crop_h), 0)
                x1 = max(min(col * stride_w, width - crop_w), 0)
                y2, x2 = min(y1 + crop_h, height), min(x1 + crop_w, width)
                window = images[:, :, y1:y2, x1:x2]
                scores[:, :, y1:y2, x1:x2] += model(window)["out"].float()
                counts[:, :, y1:y2, x1:x2] += 1
        return scores / counts

    def predict(self, model: nn.Module, batch: dict[str, Any]) -> list[dict[str, torch.Tensor]]:
        """Per image {"sem_seg": int64 (H, W) class ids at its original size} (the format of
        segtrain.predictions: a label map rather than scores keeps memory bounded)."""
        logits = self.logits(model, self.normalize(batch["images"]))
        predictions = []
        for i, (height, width) in enumerate(batch["sizes"]):
            scores = logits[i, :, :height, :width]
            orig = (int(batch["orig_sizes"][i][0]), int(batch["orig_sizes"][i][1]))
            if (height, width) != orig:  # the loader resized the image: back to its original size
                scores = nnf.interpolate(scores[None], size=orig, mode="bilinear",
                                         align_corners=False)[0]
            predictions.append({"sem_seg": scores.argmax(dim=0)})
        return predictions

    def build_evaluator(self, output_dir: str | Path | None = None) -> Evaluators:
        """The configured evaluators (default: the confusion-matrix mIoU evaluator)."""
        return build_evaluators(self.evaluators, self.meta, output_dir=output_dir)

    # -------------------------------------------------------------------------------- visuals
    def visualize(
        self, batch: dict[str, Any], predictions: list[dict[str, torch.Tensor]], max_images: int = 4
    ) -> torch.Tensor:
        """uint8 (3, rows*H, 3*W) grid: image | prediction overlay | ground-truth overlay."""
        palette = self._palette_tensor()
        rows = []
        for i in range(min(max_images, len(predictions))):
            height, width = batch["sizes"][i]
            image = batch["images"][i, :, :height, :width].cpu()
            truth = batch["semantic"][i, :height, :width].cpu()
            labels = semantic_labels(predictions[i]["sem_seg"]).cpu()
            if tuple(labels.shape) != (height, width):
                labels = nnf.interpolate(labels[None, None].float(), size=(height, width),
                                         mode="nearest")[0, 0].long()
            rows.append(torch.cat([image, _overlay(image, labels, palette),
                                   _overlay(image, truth, palette)], dim=2))
        height = max(row.shape[1] for row in rows)
        width = max(row.shape[2] for row in rows)
        return torch.cat([nnf.pad(row, (0, width - row.shape[2], 0, height - row.shape[1]))
                          for row in rows], dim=1)

    def _palette_tensor(self) -> torch.Tensor:
        if self.palette is not None:
            colours = torch.tensor(self.palette, dtype=torch.uint8)[: self.num_classes]
        else:
            g = torch.Generator().manual_seed(0)
            colours = torch.randint(0, 256, (self.num_classes, 3), generator=g, dtype=torch.uint8)
        return colours


def _overlay(image: torch.Tensor, labels: torch.Tensor, palette: torch.Tensor) -> torch.Tensor:
    """Blend class colours over a uint8 (3, H, W) image; ignored pixels stay as they are."""
    valid = labels < palette.shape[0]
    colour = palette[labels.clamp(max=palette.shape[0] - 1)].permute(2, 0, 1).float()
    blended = torch.where(valid, 0.5 * image.float() + 0.5 * colour, image.float())
    return blended.round().to(torch.uint8)


def _per_image_targets(batch: dict[str, Any]) -> list[dict[str, Any]]:
    """Each image's target dict; `semantic` is a view of its unpadded part of the batch's map."""
    targets = []
    for info, (height, width), labelled, labels in zip(batch["info"], batch["sizes"],
                                                       batch["labelled"], batch["semantic"]):
        target = dict(info)
        if labelled:
            target["semantic"] = labels[:height, :width]
        targets.append(target)
    return targets


def _pair(value: Any) -> tuple[int, int] | None:
    if value is None:
        return None
    if isinstance(value, int):
        return value, value
    h, w = value
    return int(h), int(w)
