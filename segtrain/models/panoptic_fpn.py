"""Panoptic FPN (Kirillov et al., 2019): Mask R-CNN plus a semantic FPN branch on shared features."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as nnf
from torchvision.models.detection import MaskRCNN

from segtrain.models.maskrcnn import build_maskrcnn

SEMANTIC_LOSS = "loss_sem_seg"
_FPN_STRIDES = {"0": 4, "1": 8, "2": 16, "3": 32}  # the FPN levels P2..P5 (any 4-level backbone)
# torchvision's MobileNetV3 FPN has 3 levels at strides 16 and 32 only: no P2..P5.
_NO_P2_TO_P5 = ("mobilenet_v3_large",)


class SemanticFPNHead(nn.Module):
    """The paper's semantic branch: each FPN level goes through (conv 3x3, GroupNorm, ReLU, 2x
    upsample) stages until it reaches 1/4 scale; the levels are summed, a 1x1 conv predicts the
    classes and a 4x bilinear upsample returns to the input size (detectron2's SemSegFPNHead)."""

    def __init__(self, num_classes: int, in_channels: int = 256, channels: int = 128,
                 common_stride: int = 4) -> None:
        super().__init__()
        self.common_stride = common_stride
        self.scale_heads = nn.ModuleDict()
        for level, stride in _FPN_STRIDES.items():
            stages: list[nn.Module] = []
            for k in range(max(1, int(math.log2(stride) - math.log2(common_stride)))):
                conv = nn.Conv2d(in_channels if k == 0 else channels, channels, 3, padding=1, bias=False)
                nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
                stages += [conv, nn.GroupNorm(32, channels), nn.ReLU(inplace=True)]
                if stride != common_stride:
                    stages.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            self.scale_heads[level] = nn.Sequential(*stages)
        self.predictor = nn.Conv2d(channels, num_classes, 1)
        nn.init.normal_(self.predictor.weight, std=0.001)
        nn.init.zeros_(self.predictor.bias)

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits (B, num_classes, H, W) at `common_stride` times the P2 resolution."""
        summed = None
        for level, head in self.scale_heads.items():
            out = head(features[level])
            summed = out if summed is None else summed + out
        logits = self.predictor(summed)
        return nnf.interpolate(logits, scale_factor=self.common_stride, mode="bilinear", align_corners=False)


class PanopticFPN(nn.Module):
    """A torchvision Mask R-CNN whose FPN features also feed a SemanticFPNHead.

    The Mask R-CNN's parts are attributes under their own names (`transform`, `backbone`, `rpn`,
    `roi_heads`), so state-dict keys equal Mask R-CNN's (its checkpoints load as they are) and
    the optimizer's `backbone.` prefix finds the backbone.

    Semantic classes: 0 = every thing merged, 1..num_stuff = the stuff classes (detectron2's
    layout); `ignore_index` pixels count nowhere. Train mode: `model(images, targets)` with
    targets holding Mask R-CNN's `boxes`/`labels`/`masks` plus `semantic` int64 (H, W) in that
    layout at the image's size -> Mask R-CNN's loss dict plus `loss_sem_seg`. Eval mode:
    `model(images)` -> Mask R-CNN's detections per image plus `sem_seg` logits
    (num_stuff + 1, H, W) at the image's size.
    """

    def __init__(self, detector: MaskRCNN, num_stuff: int, semantic_channels: int = 128,
                 ignore_index: int = 255) -> None:
        super().__init__()
        self.transform, self.backbone = detector.transform, detector.backbone
        self.rpn, self.roi_heads = detector.rpn, detector.roi_heads
        self.semantic_head = SemanticFPNHead(num_stuff + 1, detector.backbone.out_channels, semantic_channels)
        self.ignore_index = ignore_index

    def forward(self, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]] | None = None
                ) -> Any:
        if self.training and targets is None:
            raise ValueError("PanopticFPN in train mode needs targets (eval mode predicts)")
        original_sizes = [tuple(image.shape[-2:]) for image in images]
        detector_targets = None
        if targets is not None:
            detector_targets = [{k: t[k] for k in ("boxes", "labels", "masks")} for t in targets]
        batch, detector_targets = self.transform(images, detector_targets)
        features = self.backbone(batch.tensors)
        proposals, rpn_losses = self.rpn(batch, features, detector_targets)
        detections, roi_losses = self.roi_heads(features, proposals, batch.image_sizes,
                                                          detector_targets)
        logits = self.semantic_head(features)
        if self.training:
            semantic = self._semantic_targets([t["semantic"] for t in targets], batch.image_sizes,
                                              tuple(logits.shape[-2:]))
            if bool((semantic != self.ignore_index).any()):
                loss = nnf.cross_entropy(logits.float(), semantic, ignore_index=self.ignore_index)
            else:  # nothing labelled in the batch: CE's mean would be 0/0
                loss = logits.sum() * 0.0
            return {**rpn_losses, **roi_losses, SEMANTIC_LOSS: loss}
        detections = self.transform.postprocess(detections, batch.image_sizes, original_sizes)
        for i, (detection, (h, w)) in enumerate(zip(detections, batch.image_sizes)):
            # Crop the padding, then back to the size the image had before the model resized it.
            detection["sem_seg"] = nnf.interpolate(logits[i:i + 1, :, :h, :w], size=original_sizes[i],
                                                   mode="bilinear", align_corners=False)[0]
        return detections

    def _semantic_targets(self, semantic: list[torch.Tensor], sizes: list[tuple[int, int]],
                          padded: tuple[int, int]) -> torch.Tensor:
        """Each map resized (nearest) as the detector resized its image, padded with ignore."""
        out = semantic[0].new_full((len(semantic), *padded), self.ignore_index, dtype=torch.int64)
        for i, (label, (h, w)) in enumerate(zip(semantic, sizes)):
            resized = nnf.interpolate(label[None, None].float(), size=(h, w), mode="nearest")[0, 0]
            out[i, :h, :w] = resized.long()
        return out


def build_panoptic_fpn(num_things: int, num_stuff: int, backbone: str = "resnet50",
                       semantic_channels: int = 128, ignore_index: int = 255, **maskrcnn: Any) -> PanopticFPN:
    """Panoptic FPN over the FPN of any 4-level backbone (resnet50, convnext_tiny, swin_t,
    timm:NAME, ...; see build_maskrcnn): `num_things` thing classes for the Mask R-CNN (which
    adds its background), `num_stuff` stuff classes for the semantic branch (which adds one class
    for all things). The other keywords are build_maskrcnn's (weights, sizes, proposals, heads,
    drop_path_rate, ...)."""
    if backbone in _NO_P2_TO_P5:
        raise ValueError(f"model.backbone={backbone!r}: torchvision's {backbone} FPN has only the "
                         "stride 16 and 32 levels, and panoptic_fpn's semantic branch reads P2..P5 "
                         "(strides 4..32); use a 4-level backbone: a ResNet FPN (resnet18 .. resnet101), "
                         "convnext_tiny, swin_t, efficientnet_b0, timm:NAME, ...")
    for name, value in (("num_things", num_things), ("num_stuff", num_stuff)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"panoptic_fpn: {name}={value!r}; expected an integer >= 1 from "
                             f"dataset.{name}: train it on a panoptic dataset (synthetic_panoptic, "
                             "coco_panoptic, cityscapes_panoptic)")
    detector = build_maskrcnn(num_classes=num_things + 1, backbone=backbone, **maskrcnn)
    return PanopticFPN(detector, num_stuff, semantic_channels, ignore_index)
