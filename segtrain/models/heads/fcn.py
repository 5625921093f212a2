"""FCN head (Long et al., 2015; mmseg's FCNHead): 3x3 convs on one feature map; also the aux head."""

from __future__ import annotations

import torch
from torch import nn

from segtrain.models.heads.blocks import ClassifierHead, ConvNormAct


class FCNHead(ClassifierHead):
    """`num_convs` 3x3 ConvNormAct at `channels` on `features[in_index]`, optionally concatenated
    with that input and fused by one more 3x3 ConvNormAct, then dropout and a 1x1 classifier.

    mmseg defaults: decode head num_convs=2, channels=512, concat_input=True on the last level;
    auxiliary head num_convs=1, channels=256, concat_input=False on the stride-16 level.
    """

    def __init__(self, in_channels: list[int], num_classes: int, channels: int = 512,
                 num_convs: int = 2, concat_input: bool = True, in_index: int = -1,
                 dropout: float = 0.1) -> None:
        super().__init__(channels, num_classes, dropout)
        if num_convs < 1:
            raise ValueError(f"FCN head: num_convs={num_convs!r}; expected >= 1")
        self.in_index = in_index
        width = in_channels[in_index]
        self.convs = nn.Sequential(*(ConvNormAct(width if i == 0 else channels, channels, 3)
                                     for i in range(num_convs)))
        self.conv_cat = ConvNormAct(width + channels, channels, 3) if concat_input else None
        self.init_weights()

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        """features: NCHW maps -> logits (N, num_classes, h, w) at features[in_index]'s size."""
        x = features[self.in_index]
        y = self.convs(x)
        if self.conv_cat is not None:
            y = self.conv_cat(torch.cat([x, y], dim=1))
        return self.classify(y)
