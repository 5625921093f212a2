"""Mask2Former: backbone -> pixel decoder -> masked-attention transformer decoder, trained with the
set criterion; `build_mask2former` is what conf/model/mask2former.yaml names.

The model sees normalised, padded image batches and returns, in train mode, its weighted losses
and, in eval mode, the last layer's class and mask logits. Turning those into the prediction
format (semantic, panoptic and instance outputs) is `segtrain.models.mask2former.inference`,
called by the task adapter (`segtrain.tasks.mask2former`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from segtrain.models.backbones import Backbone
from segtrain.models.encoder_decoder import BackboneOptions, check_positive
from segtrain.models.mask2former.criterion import SetCriterion
from segtrain.models.mask2former.matcher import HungarianMatcher
from segtrain.models.mask2former.pixel_decoder import FPNPixelDecoder, MSDeformAttnPixelDecoder
from segtrain.models.mask2former.transformer_decoder import MaskedAttentionDecoder

log = logging.getLogger(__name__)
PIXEL_DECODERS = ("msdeformattn", "fpn")
LOSS_NAMES = ("loss_ce", "loss_mask", "loss_dice")


class Mask2Former(nn.Module):
    """`backbone`, `pixel_decoder`, `predictor` (the transformer decoder) and the loss.

    forward(images (N, 3, H, W) normalised, H and W multiples of 32; targets) -> in train mode the
    losses {"loss_ce", "loss_mask", "loss_dice", and "<name>_<k>" for each earlier decoder layer
    k}, each already weighted; in eval mode {"pred_logits" (N, Q, C + 1), "pred_masks"
    (N, Q, H/4, W/4)}. targets: per image "labels" int64 (T,) contiguous classes, "masks" bool
    (T, H, W) on the padded canvas, optional "ignore" bool (H, W) pixels no mask loss counts.
    """

    def __init__(self, backbone: Backbone, pixel_decoder: nn.Module, predictor: MaskedAttentionDecoder,
                 criterion: SetCriterion, deep_supervision: bool = True) -> None:
        super().__init__()
        self.backbone, self.pixel_decoder, self.predictor = backbone, pixel_decoder, predictor
        self.criterion, self.deep_supervision = criterion, deep_supervision

    def forward(self, images: torch.Tensor, targets: list[dict[str, torch.Tensor]] | None = None
                ) -> dict[str, Any]:
        features = self.backbone(images)
        mask_features, levels = self.pixel_decoder(features)
        outputs = self.predictor(levels, mask_features)
        if not self.training:
            return {"pred_logits": outputs["pred_logits"], "pred_masks": outputs["pred_masks"]}
        if targets is None:
            raise ValueError("Mask2Former in train mode needs targets (labels and masks per image)")
        if not self.deep_supervision:
            outputs = {k: v for k, v in outputs.items() if k != "aux_outputs"}
        return self.criterion(outputs, targets)


def build_mask2former(
    num_classes: int,
    backbone: str = "resnet50",
    pixel_decoder: str = "msdeformattn",
    hidden_dim: int = 256,
    num_queries: int = 100,
    nheads: int = 8,
    dim_feedforward: int = 2048,
    dec_layers: int = 10,
    enc_layers: int = 6,
    enc_dim_feedforward: int = 1024,
    mask_dim: int = 256,
    dropout: float = 0.0,
    deep_supervision: bool = True,
    num_points: int = 112 * 112,
    oversample_ratio: float = 3.0,
    importance_sample_ratio: float = 0.75,
    class_weight: float = 2.0,
    mask_weight: float = 5.0,
    dice_weight: float = 5.0,
    no_object_weight: float = 0.1,
    weights: str | None = None,
    weights_backbone: str | None = None,
    frozen_stages: int = -1,
    frozen_bn: bool = False,
    drop_path_rate: float | None = None,
    out_indices: Sequence[int] | None = None,
) -> Mask2Former:
    """Mask2Former over `num_classes` contiguous classes (+ "no object"); every key of
    conf/model/mask2former.yaml. `weights`: a whole-model state dict (segtrain's layout, or the
    official checkpoints' after `segtrain.models.mask2former.convert`)."""
    check_positive("mask2former", num_classes=num_classes, hidden_dim=hidden_dim,
                   num_queries=num_queries, nheads=nheads, dim_feedforward=dim_feedforward,
                   enc_layers=enc_layers, enc_dim_feedforward=enc_dim_feedforward, mask_dim=mask_dim,
                   num_points=num_points)
    if pixel_decoder not in PIXEL_DECODERS:
        raise ValueError(f"mask2former: model.pixel_decoder={pixel_decoder!r}; expected one of "
                         f"{', '.join(PIXEL_DECODERS)}")
    if hidden_dim % 32:
        raise ValueError(f"mask2former: model.hidden_dim={hidden_dim}; expected a multiple of 32 "
                         "(GroupNorm's 32 groups)")
    options = BackboneOptions(backbone, out_indices=out_indices, frozen_stages=frozen_stages,
                              frozen_bn=frozen_bn, drop_path_rate=drop_path_rate, weights=weights_backbone)
    if weights is not None and weights_backbone is not None:
        log.warning("mask2former: model.weights=%s already holds the backbone; ignoring "
                    "model.weights_backbone=%s", weights, weights_backbone)
        options = replace(options, weights=None)
    body = options.build()
    if len(body.channels) != 4:
        raise ValueError(f"mask2former: the backbone gives {len(body.channels)} levels "
                         f"(out_indices={out_indices}); the pixel decoder needs 4 (strides 4..32)")
    if pixel_decoder == "msdeformattn":
        decoder: nn.Module = MSDeformAttnPixelDecoder(body.channels, hidden_dim, mask_dim, nheads,
                                                      ffn_dim=enc_dim_feedforward, num_layers=enc_layers,
                                                      dropout=dropout)
    else:
        decoder = FPNPixelDecoder(body.channels, hidden_dim, mask_dim)
    predictor = MaskedAttentionDecoder(num_classes, hidden_dim, hidden_dim, num_queries, nheads,
                                       dim_feedforward, dec_layers, mask_dim, dropout)
    matcher = HungarianMatcher(class_weight, mask_weight, dice_weight, num_points)
    criterion = SetCriterion(num_classes, matcher, no_object_weight, class_weight, mask_weight, dice_weight,
                             num_points, oversample_ratio, importance_sample_ratio)
    model = Mask2Former(body, decoder, predictor, criterion, deep_supervision)
    if weights is not None:
        load_mask2former_weights(model, weights)
    return model


def load_mask2former_weights(model: Mask2Former, spec: str) -> None:
    """A whole-model state dict from `spec` (file or segtrain checkpoint; an official checkpoint is
    converted on the fly), strict except for the class embedding when the class count differs.

    An official instance checkpoint (COCO's 80 classes) loaded for an instance dataset (81 classes:
    segtrain counts the background as class 0) gets a never-winning class 0 row inserted."""
    from segtrain.models.mask2former.convert import convert_official, is_official
    from segtrain.models.weights import load_matching, load_state_dict_from_spec

    state_dict = load_state_dict_from_spec(spec, option="model.weights")
    if is_official(state_dict):
        rows = state_dict.get("sem_seg_head.predictor.class_embed.weight")
        background = rows is not None and rows.shape[0] + 1 == model.predictor.class_embed.weight.shape[0]
        if background:
            log.info("model.weights=%s: %d classes for a model of %d; inserting class 0 (background, "
                     "never predicted)", spec, rows.shape[0] - 1, rows.shape[0])
        state_dict = convert_official(state_dict, insert_background=background)
    load_matching(model, state_dict, reinit_prefixes=("predictor.class_embed.",),
                  source=f"model.weights={spec}")
