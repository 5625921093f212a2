"""Mask R-CNN builders (torchvision) over an FPN on any segtrain backbone, weights loaded offline."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torchvision.models import resnet
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor, mobilenet_backbone
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import FrozenBatchNorm2d, MultiScaleRoIAlign

from segtrain.models.backbones import TIMM_PREFIX, build_backbone
from segtrain.models.backbones.torchvision_backbones import available, family
from segtrain.models.fpn import BackboneFPN
from segtrain.models.ms_rcnn import MaskIoUHead, MaskScoringRoIHeads
from segtrain.models.pafpn import NECKS, AdaptiveRoIPool, add_bottom_up_path
from segtrain.models.weights import load_matching, load_state_dict_from_spec, resolve_weights

log = logging.getLogger(__name__)

RESNETS = {name: getattr(resnet, name) for name in ("resnet18", "resnet34", "resnet50", "resnet101")}
# Built as torchvision's own detection backbones (state-dict keys as torchvision's COCO weights and
# segtrain's older checkpoints); any other name goes through build_backbone + BackboneFPN.
BACKBONES = (*RESNETS, "mobilenet_v3_large")
# State-dict prefixes whose shape depends on the number of classes: re-initialised when a
# checkpoint (e.g. COCO's 91 classes) was trained for another class count.
PREDICTOR_HEADS = ("roi_heads.box_predictor.", "roi_heads.mask_predictor.mask_fcn_logits.")
# Parts a plain Mask R-CNN checkpoint lacks (PANet's bottom-up path, the MaskIoU head): they keep
# their fresh initialisation when a COCO Mask R-CNN file starts a PANet / Mask Scoring model.
OPTIONAL_HEADS = ("backbone.fpn.extra_blocks.", "roi_heads.maskiou_head.")
_FPN_LEVELS = ["0", "1", "2", "3"]  # the levels torchvision's RoI pools read (present ones)
_MAX_TRAINABLE = {"mobilenet_v3_large": 6}  # torchvision's count of MobileNetV3 stages; others: 5 (stem + 4)


def build_maskrcnn(
    num_classes: int,
    backbone: str = "resnet50",
    version: int = 1,
    trainable_layers: int | None = 3,
    weights: str | None = None,
    weights_backbone: str | None = None,
    min_size: int = 800,
    max_size: int = 1333,
    rpn_pre_nms_top_n_train: int = 2000,
    rpn_pre_nms_top_n_test: int = 1000,
    rpn_post_nms_top_n_train: int = 2000,
    rpn_post_nms_top_n_test: int = 1000,
    rpn_batch_size_per_image: int = 256,
    box_batch_size_per_image: int = 512,
    representation_size: int = 1024,
    mask_head_channels: int = 256,
    box_score_thresh: float = 0.05,
    box_nms_thresh: float = 0.5,
    box_detections_per_img: int = 100,
    drop_path_rate: float | None = None,
    neck: str = "fpn",
    adaptive_pooling: bool = False,
    mask_scoring: bool = False,
    anchor_sizes: Sequence[int] | None = None,
) -> MaskRCNN:
    """torchvision's Mask R-CNN with an FPN over `backbone`.

    resnet18/34/50/101 and mobilenet_v3_large are torchvision's own FPN backbones (their
    state-dict keys are torchvision's, so its COCO weights load). Any other name is a
    `segtrain.models.backbones` backbone (convnext_tiny, swin_t, regnet_y_800mf, timm:NAME, ...)
    whose 4 levels (strides 4..32) feed a BackboneFPN: P2..P5 plus a pool level, 256 channels.

    `num_classes` counts the background (torchvision's convention: labels 1..num_classes-1 are
    things). In train mode `model(images, targets)` returns the loss dict (loss_classifier,
    loss_box_reg, loss_mask, loss_objectness, loss_rpn_box_reg); in eval mode `model(images)`
    returns per image {"boxes" float (N, 4) XYXY, "labels" int64 (N,), "scores" float (N,),
    "masks" float (N, 1, H, W) probabilities in [0, 1] at the input image size}. Images are float
    (3, H, W) in [0, 1]; the model resizes (min_size/max_size) and normalises them itself.

    version 1 is the original recipe (FrozenBatchNorm in a pretrained backbone, 2-layer MLP box
    head); version 2 is torchvision's improved recipe (BatchNorm throughout, 2-conv RPN head,
    4-conv + FC box head, normalised mask head). min_size, max_size and the rpn_*/box_* keywords
    are passed to torchvision's MaskRCNN under the same names (flat, so that the YAML keys equal
    them); representation_size is the box head's width, mask_head_channels the mask head's.

    `weights` (a whole-model checkpoint, e.g. "MaskRCNN_ResNet50_FPN_Weights.COCO_V1") and
    `weights_backbone` (ImageNet classifier weights, e.g. "ResNet50_Weights.IMAGENET1K_V1") are
    local files or torchvision names found in the torch hub cache; nothing is downloaded. When the
    checkpoint was trained for another class count, only the predictor heads are re-initialised
    (logged). `trainable_layers` (0..5, the stages left unfrozen from the top) applies only when
    starting from pretrained weights; from scratch every layer trains, as in torchvision.
    `drop_path_rate` is the stochastic depth of ConvNeXt / Swin / EfficientNet / timm backbones
    (Swin's detection recipes: 0.2); null for the others.

    PANet's options (`segtrain.models.pafpn`): `neck="pafpn"` adds the bottom-up path
    augmentation after the FPN, `adaptive_pooling` pools every RoI from every level and fuses by
    max. `mask_scoring` is Mask Scoring R-CNN (`segtrain.models.ms_rcnn`): a MaskIoU head (4 convs
    of mask_head_channels, 2 FC of representation_size) adds `loss_maskiou` and rescores each
    detection by its predicted mask IoU. With the defaults (fpn, no adaptive pooling, no mask
    scoring) the model and its state-dict keys are torchvision's. `anchor_sizes`: the RPN's anchor
    size per FPN level, 5 of them (null = torchvision's 32, 64, 128, 256, 512; smaller ones for
    small objects); 3 aspect ratios each, so the RPN head (and its weights) is unchanged.
    """
    _validate(num_classes, backbone, version, drop_path_rate)
    if neck not in NECKS:
        raise ValueError(f"model.neck={neck!r}; expected one of {', '.join(NECKS)}")
    # Find the files before the (slow) construction, so that a missing one fails at once
    # (timm backbones also take weights_backbone=cache, which build_backbone checks).
    checks = [(weights, "model.weights")]
    if not backbone.startswith(TIMM_PREFIX):
        checks.append((weights_backbone, "model.weights_backbone"))
    for spec, option in checks:
        if spec is not None:
            resolve_weights(spec, option)
    pretrained = weights is not None or weights_backbone is not None
    max_trainable = _MAX_TRAINABLE.get(backbone, 5)
    if not pretrained or trainable_layers is None:
        trainable = max_trainable if not pretrained else 3
    else:
        trainable = int(trainable_layers)
        if not 0 <= trainable <= max_trainable:
            raise ValueError(f"model.trainable_layers={trainable_layers}; expected 0..{max_trainable} "
                             f"for backbone {backbone}")
    # torchvision's choice: frozen statistics in a pretrained v1 backbone, batch statistics
    # otherwise (v2 always, and any from-scratch backbone).
    frozen = version == 1 and pretrained
    if backbone in BACKBONES:
        fpn = _fpn_backbone(backbone, trainable, frozen, version)
    else:
        # trainable_layers counts stages from the top, 5 including the stem: 4 - k of them freeze.
        body = build_backbone(backbone, frozen_stages=4 - trainable, frozen_bn=frozen,
                              weights=weights_backbone if weights is None else None,
                              drop_path_rate=drop_path_rate)
        fpn = BackboneFPN(body, 256, norm_layer=nn.BatchNorm2d if version == 2 else None)
    if neck == "pafpn":  # v2 normalises the new convolutions as its FPN's
        add_bottom_up_path(fpn.fpn, fpn.out_channels, nn.BatchNorm2d if version == 2 else None)
    pool = AdaptiveRoIPool if adaptive_pooling else MultiScaleRoIAlign
    model = MaskRCNN(
        fpn,
        num_classes=None,  # the predictors below carry it
        min_size=min_size,
        max_size=max_size,
        rpn_anchor_generator=_anchor_generator(backbone, anchor_sizes),
        rpn_head=_rpn_head(fpn.out_channels, backbone, version),
        rpn_pre_nms_top_n_train=rpn_pre_nms_top_n_train,
        rpn_pre_nms_top_n_test=rpn_pre_nms_top_n_test,
        rpn_post_nms_top_n_train=rpn_post_nms_top_n_train,
        rpn_post_nms_top_n_test=rpn_post_nms_top_n_test,
        rpn_batch_size_per_image=rpn_batch_size_per_image,
        box_roi_pool=pool(_FPN_LEVELS, 7, 2),  # torchvision's default pools, or PANet's
        mask_roi_pool=pool(_FPN_LEVELS, 14, 2),
        box_head=_box_head(fpn.out_channels, representation_size, version),
        box_predictor=FastRCNNPredictor(representation_size, num_classes),
        box_batch_size_per_image=box_batch_size_per_image,
        box_score_thresh=box_score_thresh,
        box_nms_thresh=box_nms_thresh,
        box_detections_per_img=box_detections_per_img,
        mask_head=_mask_head(fpn.out_channels, mask_head_channels, version),
        mask_predictor=MaskRCNNPredictor(mask_head_channels, mask_head_channels, num_classes),
    )
    if mask_scoring:
        model.roi_heads = MaskScoringRoIHeads(model.roi_heads, MaskIoUHead(
            fpn.out_channels, num_classes, mask_head_channels, representation_size))
    if weights is not None:
        if weights_backbone is not None:
            log.warning("maskrcnn: model.weights=%s already holds the backbone; ignoring "
                        "model.weights_backbone=%s", weights, weights_backbone)
        state_dict = load_state_dict_from_spec(weights, option="model.weights")
        load_matching(model, _fit_batch_counters(model, state_dict),
                      reinit_prefixes=(*PREDICTOR_HEADS, *OPTIONAL_HEADS),
                      source=f"model.weights={weights}")
    elif weights_backbone is not None and backbone in BACKBONES:  # the others loaded it themselves
        _load_backbone(model, backbone, weights_backbone)
    return model


def _validate(num_classes: int, backbone: str, version: int, drop_path_rate: float | None) -> None:
    if not isinstance(backbone, str) or not (
            backbone in BACKBONES or backbone.startswith((TIMM_PREFIX, "mit_")) or family(backbone)):
        others = ", ".join(name for name in available() if name not in BACKBONES)
        raise ValueError(f"model.backbone={backbone!r}; expected one of {', '.join(BACKBONES)} "
                         f"(torchvision's detection backbones), another torchvision classifier "
                         f"({others}), timm:NAME or mit_b0..mit_b5")
    if backbone in BACKBONES and drop_path_rate is not None:
        raise ValueError(f"model.drop_path_rate={drop_path_rate}: backbone {backbone} has no "
                         "stochastic depth; leave it null")
    if version not in (1, 2):
        raise ValueError(f"model.version={version!r}; expected 1 (original recipe) or 2 "
                         "(torchvision's v2 recipe)")
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"maskrcnn: num_classes={num_classes!r}; expected an integer >= 2 "
                         "(the background plus at least one thing class)")


def _fpn_backbone(name: str, trainable: int, frozen: bool, version: int) -> nn.Module:
    norm = FrozenBatchNorm2d if frozen else nn.BatchNorm2d
    if name == "mobilenet_v3_large":
        # torchvision's MobileNetV3 FPN: the last two stages (strides 16 and 32) plus a pool level.
        return mobilenet_backbone(backbone_name=name, weights=None, fpn=True, norm_layer=norm,
                                  trainable_layers=trainable)
    body = RESNETS[name](weights=None, norm_layer=norm)
    # v2 normalises the FPN's own convolutions as well.
    return _resnet_fpn_extractor(body, trainable, norm_layer=nn.BatchNorm2d if version == 2 else None)


def _anchor_generator(backbone: str, anchor_sizes: Sequence[int] | None = None) -> AnchorGenerator:
    sizes = tuple(int(size) for size in (anchor_sizes or (32, 64, 128, 256, 512)))
    if len(sizes) != 5 or min(sizes) <= 0:
        raise ValueError(f"model.anchor_sizes={list(anchor_sizes)}; expected 5 positive sizes in "
                         "pixels, one per FPN level (torchvision's: [32, 64, 128, 256, 512])")
    if backbone == "mobilenet_v3_large":  # 3 coarse levels share every size (torchvision's choice)
        return AnchorGenerator((sizes,) * 3, ((0.5, 1.0, 2.0),) * 3)
    return AnchorGenerator(tuple((size,) for size in sizes), ((0.5, 1.0, 2.0),) * 5)


def _rpn_head(channels: int, backbone: str, version: int) -> RPNHead:
    anchors = 15 if backbone == "mobilenet_v3_large" else 3
    return RPNHead(channels, anchors, conv_depth=2 if version == 2 else 1)


def _box_head(channels: int, representation_size: int, version: int) -> nn.Module:
    if version == 2:
        return FastRCNNConvFCHead((channels, 7, 7), [256] * 4, [representation_size],
                                  norm_layer=nn.BatchNorm2d)
    return TwoMLPHead(channels * 7 * 7, representation_size)


def _mask_head(channels: int, width: int, version: int) -> MaskRCNNHeads:
    norm = nn.BatchNorm2d if version == 2 else None
    return MaskRCNNHeads(channels, [width] * 4, 1, norm_layer=norm)


def _fit_batch_counters(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> dict:
    """Drop BatchNorm's `num_batches_tracked` where the model's FrozenBatchNorm2d has none."""
    own = model.state_dict()
    return {key: value for key, value in state_dict.items()
            if key in own or not key.endswith("num_batches_tracked")}


def _load_backbone(model: MaskRCNN, backbone: str, weights_backbone: str) -> None:
    """ImageNet classifier weights into `model.backbone.body`; the classifier itself is dropped."""
    state_dict = load_state_dict_from_spec(weights_backbone, option="model.weights_backbone")
    # The FPN body keeps torchvision's classifier names: ResNet's stages as they are,
    # MobileNetV3's `features.<i>` as `<i>`.
    prefix = "features." if backbone == "mobilenet_v3_large" else ""
    renamed = {key[len(prefix):]: value for key, value in state_dict.items() if key.startswith(prefix)}
    extra = tuple(key for key in state_dict if not key.startswith(prefix))
    if extra:
        log.info("model.weights_backbone=%s: ignoring %d classifier keys", weights_backbone, len(extra))
    load_matching(model.backbone.body, _fit_batch_counters(model.backbone.body, renamed),
                  ignore_prefixes=("fc.", "avgpool."),
                  source=f"model.weights_backbone={weights_backbone}")

