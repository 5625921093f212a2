"""PANet (Liu et al., CVPR 2018): bottom-up path augmentation and adaptive feature pooling.

Both plug into torchvision's detection parts without changing any existing state-dict key:

- `BottomUpPath` is a torchvision FPN "extra block" (`FeaturePyramidNetwork.extra_blocks`, the
  hook that normally appends the max-pooled P6). It receives the FPN's outputs P2..P5 (any
  number of levels, finest first), builds N2 = P2, N_{i+1} = conv3x3(P_{i+1} + conv3x3_s2(N_i))
  (MMDetection's PAFPN: the stride-2 conv reads the running sum, before the output conv; no
  activation, as its FPN) and then appends the pool level from the coarsest N, as before. So
  torchvision's ResNet/MobileNet FPN and segtrain's BackboneFPN both get it by swapping one
  attribute; their parameters keep their names and new ones live under `fpn.extra_blocks.`.
- `AdaptiveRoIPool` is a MultiScaleRoIAlign that pools every RoI from every level and fuses them
  by element-wise max (the paper's fusion; its per-level parameter layer before the max is not
  built: fusion right after RoIAlign is the option here).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as nnf
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign, roi_align
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock
from torchvision.ops.poolers import _convert_to_roi_format, _filter_input, _setup_scales

NECKS = ("fpn", "pafpn")


def _conv(channels: int, stride: int, norm_layer: Callable[..., nn.Module] | None) -> nn.Module:
    """3x3 conv (+ norm, no activation) initialised as torchvision's FPN convolutions."""
    conv = nn.Conv2d(channels, channels, 3, stride=stride, padding=1, bias=norm_layer is None)
    nn.init.kaiming_uniform_(conv.weight, a=1)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    return nn.Sequential(conv, norm_layer(channels)) if norm_layer is not None else nn.Sequential(conv)


class BottomUpPath(ExtraFPNBlock):
    """PANet's bottom-up path over `num_levels` FPN outputs of `channels` channels, then the
    pool level (a stride-2 max pool of the coarsest output, torchvision's LastLevelMaxPool).

    `forward(results, x, names)` follows torchvision's ExtraFPNBlock API: `results` are the FPN
    outputs finest first, `x` the backbone inputs (unused), `names` their keys; it returns the
    augmented levels (same shapes) plus "pool"."""

    def __init__(self, channels: int, num_levels: int,
                 norm_layer: Callable[..., nn.Module] | None = None) -> None:
        super().__init__()
        if num_levels < 2:
            raise ValueError(f"pafpn needs at least 2 FPN levels, got {num_levels}")
        self.downsample = nn.ModuleList(_conv(channels, 2, norm_layer) for _ in range(num_levels - 1))
        self.output = nn.ModuleList(_conv(channels, 1, norm_layer) for _ in range(num_levels - 1))

    def forward(self, results: list[torch.Tensor], x: list[torch.Tensor], names: list[str]
                ) -> tuple[list[torch.Tensor], list[str]]:
        if len(results) != len(self.downsample) + 1:
            raise ValueError(f"pafpn was built for {len(self.downsample) + 1} FPN levels, got {len(results)}")
        running = results[0]
        outs = [running]  # N2 = P2
        for down, out, level in zip(self.downsample, self.output, results[1:]):
            step = down(running)
            if step.shape[-2:] != level.shape[-2:]:  # odd sizes on a backbone that floors its strides
                step = nnf.interpolate(step, size=level.shape[-2:], mode="nearest")
            running = level + step
            outs.append(out(running))
        return [*outs, nnf.max_pool2d(outs[-1], 1, 2, 0)], [*names, "pool"]


def add_bottom_up_path(fpn: FeaturePyramidNetwork, channels: int,
                       norm_layer: Callable[..., nn.Module] | None = None) -> BottomUpPath:
    """Turn a torchvision FeaturePyramidNetwork (with its max-pool extra level) into PANet's neck
    in place: its `extra_blocks` becomes a BottomUpPath over its own levels. Returns the block."""
    block = BottomUpPath(channels, len(fpn.layer_blocks), norm_layer)
    fpn.extra_blocks = block
    return block


class AdaptiveRoIPool(MultiScaleRoIAlign):
    """PANet's adaptive feature pooling: each RoI is RoIAligned on every level in
    `featmap_names` (at that level's scale) and the results fused by element-wise max, instead of
    reading the one level its size maps to. Same constructor and call as MultiScaleRoIAlign."""

    def forward(self, x: dict[str, torch.Tensor], boxes: list[torch.Tensor],
                image_shapes: list[tuple[int, int]]) -> torch.Tensor:
        levels = _filter_input(x, self.featmap_names)
        if self.scales is None:
            self.scales, self.map_levels = _setup_scales(levels, image_shapes, self.canonical_scale,
                                                         self.canonical_level)
        rois = _convert_to_roi_format(boxes)
        fused = None
        for level, scale in zip(levels, self.scales):
            pooled = roi_align(level, rois, self.output_size, spatial_scale=scale,
                               sampling_ratio=self.sampling_ratio, aligned=False)
            fused = pooled if fused is None else torch.maximum(fused, pooled)
        return fused
