"""UPerNet decoder (Xiao et al., 2018; mmseg's UPerHead): pyramid pooling on top of an FPN."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from segtrain.models.heads.blocks import ClassifierHead, ConvNormAct, PyramidPooling, resize


class UPerHead(ClassifierHead):
    """PPM (bins `pool_scales`) + 3x3 bottleneck on the last map; 1x1 laterals on the others;
    top-down sum with bilinear upsampling; 3x3 FPN convs; every level upsampled to the finest
    and concatenated; 3x3 fuse conv; dropout; 1x1 classifier. All at `channels`."""

    def __init__(self, in_channels: list[int], num_classes: int, channels: int = 512,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1) -> None:
        super().__init__(channels, num_classes, dropout)
        self.ppm = PyramidPooling(in_channels[-1], channels, pool_scales)
        self.bottleneck = ConvNormAct(in_channels[-1] + len(pool_scales) * channels, channels, 3)
        self.laterals = nn.ModuleList(ConvNormAct(c, channels, 1) for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(ConvNormAct(channels, channels, 3) for _ in in_channels[:-1])
        self.fuse = ConvNormAct(len(in_channels) * channels, channels, 3)
        self.init_weights()

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        """features: NCHW maps, finest first -> logits (N, num_classes, h, w) at the first map's
        size."""
        levels = [lateral(f) for lateral, f in zip(self.laterals, features)]
        levels.append(self.bottleneck(torch.cat(self.ppm(features[-1]), dim=1)))
        for i in range(len(levels) - 1, 0, -1):  # top-down: each level gets the coarser one added
            levels[i - 1] = levels[i - 1] + resize(levels[i], levels[i - 1].shape[-2:])
        outs = [conv(level) for conv, level in zip(self.fpn_convs, levels)] + [levels[-1]]
        size = outs[0].shape[-2:]
        return self.classify(self.fuse(torch.cat([resize(o, size) for o in outs], dim=1)))
