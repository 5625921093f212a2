"""Semantic segmentation losses: `loss(logits (N, C, H, W), target (N, H, W)) -> scalar`."""

from segtrain.losses.combined import CombinedLoss
from segtrain.losses.cross_entropy import CrossEntropyLoss, OhemCrossEntropyLoss
from segtrain.losses.dice import DiceLoss
from segtrain.losses.focal import FocalLoss
from segtrain.losses.lovasz import LovaszSoftmaxLoss

__all__ = [
    "CombinedLoss",
    "CrossEntropyLoss",
    "DiceLoss",
    "FocalLoss",
    "LovaszSoftmaxLoss",
    "OhemCrossEntropyLoss",
]
