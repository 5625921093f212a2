"""U-Net decoder over a backbone's feature pyramid (as segmentation_models.pytorch's Unet)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from segtrain.models.heads.blocks import ClassifierHead, ConvNormAct

DECODER_CHANNELS = (256, 128, 64, 32, 16)


class DecoderBlock(nn.Sequential):
    """Two 3x3 ConvNormAct over [upsampled x, skip] (or the upsampled x alone)."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int) -> None:
        super().__init__(ConvNormAct(in_channels + skip_channels, out_channels, 3),
                         ConvNormAct(out_channels, out_channels, 3))

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        # Nearest upsampling (as smp) to the skip's actual size: odd inputs give maps that are not
        # exact multiples of each other.
        size = skip.shape[-2:] if skip is not None else (2 * x.shape[-2], 2 * x.shape[-1])
        x = F.interpolate(x, size=size, mode="nearest")
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return super().forward(x)


class UNetHead(ClassifierHead):
    """From the deepest map, one DecoderBlock per finer map (upsample, concat it, two 3x3 convs),
    then blocks without skip, each doubling the size, until stride 1: for a stride 4..32 pyramid,
    3 + 2 blocks, one per `decoder_channels` entry. Dropout, 1x1 classifier.

    num_upsamplings: blocks without skip after the finest map (log2 of its stride).
    """

    def __init__(self, in_channels: list[int], num_classes: int, num_upsamplings: int,
                 decoder_channels: Sequence[int] = DECODER_CHANNELS, dropout: float = 0.0) -> None:
        decoder_channels = list(decoder_channels)
        needed = len(in_channels) - 1 + num_upsamplings
        if len(decoder_channels) != needed or not all(c >= 1 for c in decoder_channels):
            raise ValueError(f"model.decoder_channels={decoder_channels}; expected {needed} positive "
                             f"widths: one per skip level ({len(in_channels) - 1}) and per "
                             f"upsampling to full resolution ({num_upsamplings})")
        super().__init__(decoder_channels[-1], num_classes, dropout)
        skips = list(reversed(in_channels[:-1])) + [0] * num_upsamplings
        widths = [in_channels[-1]] + decoder_channels[:-1]
        self.blocks = nn.ModuleList(DecoderBlock(w, s, c)
                                    for w, s, c in zip(widths, skips, decoder_channels))
        self.init_weights()

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        """features: NCHW maps, finest first -> logits (N, num_classes, h, w) at
        2**num_upsamplings times the first map's size."""
        skips = list(reversed(features[:-1]))
        x = features[-1]
        for i, block in enumerate(self.blocks):
            x = block(x, skips[i] if i < len(skips) else None)
        return self.classify(x)
