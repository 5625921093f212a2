"""PSPNet's pyramid pooling head (Zhao et al., 2017; mmseg's PSPHead)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from segtrain.models.heads.blocks import ClassifierHead, ConvNormAct, PyramidPooling


class PSPHead(ClassifierHead):
    """Pyramid pooling (bins `pool_scales`, each to `channels`) on the last feature map, concatenated
    with it, a 3x3 ConvNormAct bottleneck to `channels`, dropout, 1x1 classifier."""

    def __init__(self, in_channels: list[int], num_classes: int, channels: int = 512,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1) -> None:
        super().__init__(channels, num_classes, dropout)
        self.ppm = PyramidPooling(in_channels[-1], channels, pool_scales)
        self.bottleneck = ConvNormAct(in_channels[-1] + len(pool_scales) * channels, channels, 3)
        self.init_weights()

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        """features: NCHW maps -> logits (N, num_classes, h, w) at the last map's size."""
        return self.classify(self.bottleneck(torch.cat(self.ppm(features[-1]), dim=1)))
