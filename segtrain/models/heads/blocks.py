"""Building blocks the decode heads share: conv-BN-ReLU, separable convs, pyramid pooling, resizing."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resize of NCHW `x` to `size` (h, w); a no-op when it already has that size."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class ConvNormAct(nn.Sequential):
    """conv (no bias: BatchNorm's mean subtraction cancels it) -> BatchNorm -> ReLU; "same" padding."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1,
                 dilation: int = 1, groups: int = 1) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, padding=dilation * (kernel_size // 2),
                      dilation=dilation, groups=groups, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class SeparableConvNormAct(nn.Sequential):
    """Depthwise 3x3 (+ BN, ReLU) then pointwise 1x1 (+ BN, ReLU), as DeepLabV3+ (mmseg's
    DepthwiseSeparableConvModule): ~k*k times fewer weights than a full 3x3 conv."""

    def __init__(self, in_channels: int, out_channels: int, dilation: int = 1) -> None:
        super().__init__(
            ConvNormAct(in_channels, in_channels, 3, dilation=dilation, groups=in_channels),
            ConvNormAct(in_channels, out_channels, 1),
        )


class PyramidPooling(nn.Module):
    """PSPNet's pyramid pooling: per bin size b, adaptive average pool to b x b, 1x1 ConvNormAct,
    bilinear upsampling back; returns [x, *pooled] for the caller to concatenate."""

    def __init__(self, in_channels: int, channels: int, pool_scales: Sequence[int]) -> None:
        super().__init__()
        self.stages = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(scale), ConvNormAct(in_channels, channels, 1))
            for scale in pool_scales)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x (N, C, h, w) -> [x, (N, channels, h, w) per bin]."""
        return [x] + [resize(stage(x), x.shape[-2:]) for stage in self.stages]


class ClassifierHead(nn.Module):
    """Base of the decode heads: `self.classify` = dropout -> 1x1 conv to classes (`self.classifier`,
    the only layer whose shape depends on num_classes), and the heads' weight init."""

    def __init__(self, channels: int, num_classes: int, dropout: float) -> None:
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"head dropout={dropout!r}; expected 0 <= dropout < 1")
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(x))

    def init_weights(self) -> None:
        """He (fan-out) convs as mmcv's ConvModule; classifier N(0, 0.01) as mmseg's conv_seg, so
        the first logits are near zero and the first loss near log(num_classes)."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)
