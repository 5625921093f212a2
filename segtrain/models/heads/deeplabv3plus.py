"""DeepLabV3+ decoder (Chen et al., 2018; mmseg's DepthwiseSeparableASPPHead)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from segtrain.models.heads.blocks import ClassifierHead, ConvNormAct, SeparableConvNormAct, resize

# The paper's atrous rates at output stride 16; rate * output_stride is kept constant so the
# branches see the same image-space context at any output stride (12, 24, 36 at 8).
RATES_AT_16 = (6, 12, 18)


def aspp_dilations(output_stride: int) -> tuple[int, ...]:
    """ASPP rates for a backbone of `output_stride`: 8 -> (12, 24, 36), 16 -> (6, 12, 18),
    32 -> (3, 6, 9)."""
    if output_stride not in (8, 16, 32):
        raise ValueError(f"DeepLabV3+: the backbone's last stride is {output_stride}; expected 8, "
                         "16 or 32 (model.output_stride)")
    return tuple(rate * 16 // output_stride for rate in RATES_AT_16)


class DeepLabV3PlusHead(ClassifierHead):
    """ASPP on the last map (image pooling, 1x1, three separable 3x3 at `dilations`; 3x3
    bottleneck), upsampled to the first (stride-4) map, which is projected to
    `low_level_channels` and concatenated; two separable 3x3 convs; dropout; 1x1 classifier."""

    def __init__(self, in_channels: list[int], num_classes: int, dilations: Sequence[int],
                 channels: int = 512, low_level_channels: int = 48, dropout: float = 0.1) -> None:
        super().__init__(channels, num_classes, dropout)
        if len(in_channels) < 2:
            raise ValueError(f"DeepLabV3+ needs a low-level and a deep feature map; the backbone "
                             f"gives {len(in_channels)} (model.out_indices)")
        deep = in_channels[-1]
        self.image_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), ConvNormAct(deep, channels, 1))
        self.aspp = nn.ModuleList([ConvNormAct(deep, channels, 1)] + [
            SeparableConvNormAct(deep, channels, dilation=d) for d in dilations])
        self.bottleneck = ConvNormAct((len(dilations) + 2) * channels, channels, 3)
        self.low_level = ConvNormAct(in_channels[0], low_level_channels, 1)
        self.fuse = nn.Sequential(SeparableConvNormAct(channels + low_level_channels, channels),
                                  SeparableConvNormAct(channels, channels))
        self.init_weights()

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        """features: NCHW maps, finest first -> logits (N, num_classes, h, w) at the first map's
        size."""
        x = features[-1]
        branches = [resize(self.image_pool(x), x.shape[-2:])] + [branch(x) for branch in self.aspp]
        y = self.bottleneck(torch.cat(branches, dim=1))
        low = self.low_level(features[0])
        y = torch.cat([resize(y, low.shape[-2:]), low], dim=1)
        return self.classify(self.fuse(y))
