"""SegFormer's all-MLP decoder (Xie et al., 2021)."""

from __future__ import annotations

import torch
from torch import nn

from segtrain.models.heads.blocks import ClassifierHead, ConvNormAct, resize


class SegFormerHead(ClassifierHead):
    """Per level a linear layer (1x1 conv with bias) to `channels`, all upsampled to the first
    (stride-4) map and concatenated, a 1x1 ConvNormAct fuse, dropout, a 1x1 classifier.
    The paper's `channels`: 256 for MiT-B0/B1, 768 for B2..B5."""

    def __init__(self, in_channels: list[int], num_classes: int, channels: int = 256,
                 dropout: float = 0.1) -> None:
        super().__init__(channels, num_classes, dropout)
        self.linears = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in in_channels)
        self.fuse = ConvNormAct(len(in_channels) * channels, channels, 1)
        self.init_weights()
        for linear in self.linears:  # the official MLP layers are nn.Linear: truncated normal
            nn.init.trunc_normal_(linear.weight, std=0.02)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        """features: NCHW maps, finest first -> logits (N, num_classes, h, w) at the first map's
        size."""
        size = features[0].shape[-2:]
        # The official decoder concatenates coarsest first; the order fixes the fuse conv's layout.
        embedded = [resize(linear(f), size) for linear, f in zip(self.linears, features)]
        return self.classify(self.fuse(torch.cat(embedded[::-1], dim=1)))
