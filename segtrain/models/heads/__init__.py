"""Decode heads: `head(features: list of NCHW maps, finest first) -> logits at a map's size`.

Each takes the backbone's `in_channels` and `num_classes`; its 1x1 classifier is `classifier`.
"""

from segtrain.models.heads.blocks import ClassifierHead, ConvNormAct, resize
from segtrain.models.heads.deeplabv3plus import DeepLabV3PlusHead, aspp_dilations
from segtrain.models.heads.fcn import FCNHead
from segtrain.models.heads.psp import PSPHead
from segtrain.models.heads.segformer import SegFormerHead
from segtrain.models.heads.unet import UNetHead
from segtrain.models.heads.upernet import UPerHead

__all__ = ["ClassifierHead", "ConvNormAct", "DeepLabV3PlusHead", "FCNHead", "PSPHead",
           "SegFormerHead", "UNetHead", "UPerHead", "aspp_dilations", "resize"]
