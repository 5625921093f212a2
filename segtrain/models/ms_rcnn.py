"""Mask Scoring R-CNN (Huang et al., CVPR 2019): a MaskIoU head rescores torchvision's masks.

`MaskIoUHead` regresses, per class, the IoU of the predicted mask with its object from the
mask branch's RoI features (14x14) concatenated with the max-pooled predicted mask (28x28 ->
14x14). `MaskScoringRoIHeads` is torchvision's RoIHeads with that head: its box branch and mask
branch are torchvision's own (same modules, same state-dict keys, plus `maskiou_head.`); in
training it adds `loss_maskiou`, at inference it multiplies each detection's class score by the
predicted IoU of its class. `build_maskrcnn(mask_scoring=True)` (model=ms_rcnn) installs it on
any backbone.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as nnf
from torchvision.models.detection.roi_heads import (
    RoIHeads,
    fastrcnn_loss,
    maskrcnn_inference,
    project_masks_on_boxes,
)

MASKIOU_LOSS = "loss_maskiou"


class MaskIoUHead(nn.Module):
    """MMDetection's MaskIoUHead: 4 conv 3x3 (the last stride 2) + 2 FC + one IoU per class.

    `forward(roi_features (R, in_channels, S, S), mask_logits (R, 2S, 2S))` -> (R, num_classes)
    predicted IoUs; the mask logits go through a sigmoid and a 2x2 max pool first."""

    def __init__(self, in_channels: int, num_classes: int, conv_channels: int = 256,
                 fc_channels: int = 1024, roi_size: int = 14) -> None:
        super().__init__()
        convs: list[nn.Module] = []
        for i in range(4):
            conv = nn.Conv2d(in_channels + 1 if i == 0 else conv_channels, conv_channels, 3,
                             stride=2 if i == 3 else 1, padding=1)
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(conv.bias)
            convs += [conv, nn.ReLU(inplace=True)]
        self.convs = nn.Sequential(*convs)
        pooled = (roi_size + 1) // 2
        self.fcs = nn.Sequential(nn.Linear(conv_channels * pooled * pooled, fc_channels),
                                 nn.ReLU(inplace=True), nn.Linear(fc_channels, fc_channels),
                                 nn.ReLU(inplace=True))
        for fc in self.fcs:
            if isinstance(fc, nn.Linear):
                nn.init.kaiming_uniform_(fc.weight, a=1)
                nn.init.zeros_(fc.bias)
        self.fc_mask_iou = nn.Linear(fc_channels, num_classes)
        nn.init.normal_(self.fc_mask_iou.weight, std=0.01)
        nn.init.zeros_(self.fc_mask_iou.bias)

    def forward(self, roi_features: torch.Tensor, mask_logits: torch.Tensor) -> torch.Tensor:
        mask = nnf.max_pool2d(mask_logits.sigmoid()[:, None], 2, 2)
        x = self.convs(torch.cat([roi_features, mask.to(roi_features.dtype)], 1))
        return self.fc_mask_iou(self.fcs(x.flatten(1)))


def area_ratios(gt_masks: torch.Tensor, boxes: torch.Tensor, matched: torch.Tensor) -> torch.Tensor:
    """Per RoI, the fraction of its object's mask area (image pixels) that lies inside the RoI box
    (MMDetection's `_get_area_ratio`: box corners truncated to pixels, at least one pixel wide)."""
    if not len(boxes):
        return boxes.new_zeros((0,))
    height, width = gt_masks.shape[-2:]
    totals = gt_masks.flatten(1).sum(1).float()
    corners = boxes.detach().floor().long()
    x0, x1 = corners[:, 0].clamp(0, width), corners[:, 2].clamp(0, width)
    y0, y1 = corners[:, 1].clamp(0, height), corners[:, 3].clamp(0, height)
    x1, y1 = torch.maximum(x1, x0 + 1), torch.maximum(y1, y0 + 1)
    # One host sync per image for the slice bounds; a per-RoI crop keeps memory at one mask
    # (integral images of hundreds of full-size masks would not fit).
    inside = [gt_masks[g, a:b, c:d].sum() for g, a, b, c, d in
              zip(matched.tolist(), y0.tolist(), y1.tolist(), x0.tolist(), x1.tolist())]
    return torch.stack(inside).float() / (totals[matched] + 1e-7)


def mask_iou_targets(mask_logits: torch.Tensor, mask_targets: torch.Tensor,
                     ratios: torch.Tensor) -> torch.Tensor:
    """IoU of each binarised predicted mask (logit > 0) with its whole object, in the RoI's
    (M, M) frame (the paper's / MMDetection's `mask_iou_targets`): the intersection is counted
    inside the RoI, the object's area is its area inside the RoI divided by `ratios` (the share
    of the object inside the RoI), so an RoI that cuts its object off is not rewarded."""
    pred = (mask_logits > 0).float()
    target = (mask_targets >= 0.5).float()
    overlap = (pred * target).sum((1, 2))
    full_area = target.sum((1, 2)) / (ratios + 1e-7)
    return overlap / (pred.sum((1, 2)) + full_area - overlap).clamp_min(1.0)


def maskiou_loss(predicted: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """½ mean squared error over the RoIs with a positive IoU target (the official `l2_loss`,
    MMDetection's MSELoss x 0.5); zero, still connected to the graph, when there is none."""
    keep = targets > 0
    if not bool(keep.any()):
        return predicted.sum() * 0.0
    return 0.5 * nnf.mse_loss(predicted[keep].float(), targets[keep].float())


class MaskScoringRoIHeads(RoIHeads):
    """torchvision's RoIHeads (taken over from `heads`: the same modules and settings) plus a
    `maskiou_head`. Training adds `loss_maskiou` on the positive RoIs; eval sets each
    detection's score to class score x predicted IoU of its class (clamped to [0, 1]), sorted."""

    def __init__(self, heads: RoIHeads, maskiou_head: MaskIoUHead) -> None:
        if not heads.has_mask():
            raise ValueError("Mask Scoring R-CNN needs the mask branch (mask_roi_pool, head, predictor)")
        super().__init__(
            heads.box_roi_pool, heads.box_head, heads.box_predictor,
            heads.proposal_matcher.high_threshold, heads.proposal_matcher.low_threshold,
            heads.fg_bg_sampler.batch_size_per_image, heads.fg_bg_sampler.positive_fraction,
            heads.box_coder.weights, heads.score_thresh, heads.nms_thresh, heads.detections_per_img,
            heads.mask_roi_pool, heads.mask_head, heads.mask_predictor)
        self.maskiou_head = maskiou_head

    def forward(self, features: dict[str, torch.Tensor], proposals: list[torch.Tensor],
                image_shapes: list[tuple[int, int]], targets: list[dict[str, torch.Tensor]] | None = None
                ) -> tuple[list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
        if self.training:
            if targets is None:
                raise ValueError("MaskScoringRoIHeads in train mode needs targets")
            proposals, matched_idxs, labels, regression_targets = self.select_training_samples(
                proposals, targets)
        box_features = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, box_regression = self.box_predictor(box_features)
        if self.training:
            classifier, box_reg = fastrcnn_loss(class_logits, box_regression, labels, regression_targets)
            losses = {"loss_classifier": classifier, "loss_box_reg": box_reg}
            losses.update(self._mask_losses(features, proposals, image_shapes, targets, matched_idxs, labels))
            return [], losses
        boxes, scores, labels = self.postprocess_detections(class_logits, box_regression, proposals,
                                                            image_shapes)
        return self._scored_masks(features, boxes, scores, labels, image_shapes), {}

    def _mask_losses(self, features: dict[str, torch.Tensor], proposals: list[torch.Tensor],
                     image_shapes: list[tuple[int, int]], targets: list[dict[str, torch.Tensor]],
                     matched_idxs: list[torch.Tensor], labels: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """torchvision's mask loss on the positive RoIs, and the MaskIoU loss on the same RoIs."""
        positive = [torch.where(label > 0)[0] for label in labels]
        rois = [p[i] for p, i in zip(proposals, positive)]
        matched = [m[i] for m, i in zip(matched_idxs, positive)]
        roi_features = self.mask_roi_pool(features, rois, image_shapes)
        mask_logits = self.mask_predictor(self.mask_head(roi_features))
        size = mask_logits.shape[-1]
        gt_masks = [t["masks"] for t in targets]
        classes = torch.cat([t["labels"][m] for t, m in zip(targets, matched)])
        mask_targets = torch.cat([project_masks_on_boxes(g, r, m, size)
                                  for g, r, m in zip(gt_masks, rois, matched)])
        index = torch.arange(len(classes), device=classes.device)
        selected = mask_logits[index, classes]
        if not len(classes):  # as torchvision's maskrcnn_loss: BCE's mean would be 0/0
            return {"loss_mask": mask_logits.sum() * 0.0,
                    MASKIOU_LOSS: self.maskiou_head(roi_features, selected).sum() * 0.0}
        loss_mask = nnf.binary_cross_entropy_with_logits(selected, mask_targets)
        with torch.no_grad():
            ratios = torch.cat([area_ratios(g, r, m) for g, r, m in zip(gt_masks, rois, matched)])
            iou_targets = mask_iou_targets(selected, mask_targets, ratios)
        predicted = self.maskiou_head(roi_features, selected)[index, classes]
        return {"loss_mask": loss_mask, MASKIOU_LOSS: maskiou_loss(predicted, iou_targets)}

    def _scored_masks(self, features: dict[str, torch.Tensor], boxes: list[torch.Tensor],
                      scores: list[torch.Tensor], labels: list[torch.Tensor],
                      image_shapes: list[tuple[int, int]]) -> list[dict[str, torch.Tensor]]:
        roi_features = self.mask_roi_pool(features, boxes, image_shapes)
        mask_logits = self.mask_predictor(self.mask_head(roi_features))
        classes = torch.cat(labels)
        index = torch.arange(len(classes), device=classes.device)
        iou = self.maskiou_head(roi_features, mask_logits[index, classes])[index, classes]
        counts = [len(b) for b in boxes]
        ious = iou.float().clamp(0.0, 1.0).split(counts)
        result = []
        for box, score, label, prob, predicted in zip(boxes, scores, labels,
                                                      maskrcnn_inference(mask_logits, labels), ious):
            score = score * predicted
            order = score.argsort(descending=True)  # best first, as torchvision's NMS leaves them
            result.append({"boxes": box[order], "labels": label[order], "scores": score[order],
                           "masks": prob[order]})
        return result
