"""Mask2Former's pixel decoders: per-pixel mask features at stride 4 plus the three coarser levels
(strides 32, 16, 8) the transformer decoder attends to, round-robin.

`MSDeformAttnPixelDecoder` is the paper's: a 6-layer deformable-attention encoder over strides
8-32, then an FPN step down to stride 4. `FPNPixelDecoder` (MaskFormer's plain FPN) is the cheap
option. Parameter names follow the official implementation, so its checkpoints convert by
renaming prefixes (convert.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from segtrain.models.mask2former.ms_deform_attn import MSDeformAttn

GROUPS = 32  # GroupNorm groups throughout, as the official configs


def sine_position_embedding(x: torch.Tensor, num_feats: int, temperature: float = 10000.0
                            ) -> torch.Tensor:
    """DETR's normalised sine embedding of an (N, C, h, w) map's positions: (N, 2 * num_feats, h, w),
    y features first; positions scaled to (0, 2 pi] over the map (no padding mask: batches are
    padded to a common size and padding is treated as image, as the reference does)."""
    batch, _, height, width = x.shape
    scale, eps = 2 * math.pi, 1e-6
    work = torch.promote_types(x.dtype, torch.float32)  # float32 as the reference; float64 stays
    y = torch.arange(1, height + 1, dtype=work, device=x.device) / (height + eps) * scale
    xs = torch.arange(1, width + 1, dtype=work, device=x.device) / (width + eps) * scale
    dim_t = torch.arange(num_feats, dtype=work, device=x.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)
    pos_y, pos_x = y[:, None] / dim_t, xs[:, None] / dim_t  # (h, F), (w, F)
    pos_y = torch.stack((pos_y[:, 0::2].sin(), pos_y[:, 1::2].cos()), dim=2).flatten(1)
    pos_x = torch.stack((pos_x[:, 0::2].sin(), pos_x[:, 1::2].cos()), dim=2).flatten(1)
    pos = torch.cat([pos_y[:, None, :].expand(height, width, -1),
                     pos_x[None, :, :].expand(height, width, -1)], dim=-1)
    return pos.permute(2, 0, 1)[None].expand(batch, -1, -1, -1).to(x.dtype)


class ConvGN(nn.Conv2d):
    """Conv2d with a GroupNorm (`.norm`) and optional ReLU after it; detectron2's `Conv2d(norm=)`,
    whose state-dict layout (`weight`, `norm.weight`, ...) this keeps."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, relu: bool) -> None:
        super().__init__(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
        self.norm = nn.GroupNorm(GROUPS, out_channels)
        self.relu = relu
        nn.init.kaiming_uniform_(self.weight, a=1)  # detectron2's c2_xavier_fill

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.norm(super().forward(x))
        return F.relu(out) if self.relu else out


class DeformableEncoderLayer(nn.Module):
    """Post-norm: x + deformable self-attention -> LayerNorm -> x + FFN -> LayerNorm."""

    def __init__(self, dim: int, heads: int, levels: int, points: int, ffn_dim: int,
                 dropout: float) -> None:
        super().__init__()
        self.self_attn = MSDeformAttn(dim, levels, heads, points)
        self.norm1 = nn.LayerNorm(dim)
        self.linear1 = nn.Linear(dim, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, reference: torch.Tensor,
                shapes: list[tuple[int, int]]) -> torch.Tensor:
        x = self.norm1(x + self.dropout(self.self_attn(x + pos, reference, x, shapes)))
        ffn = self.linear2(self.dropout(F.relu(self.linear1(x))))
        return self.norm2(x + self.dropout(ffn))


class DeformableEncoder(nn.Module):
    """`layers` DeformableEncoderLayers over the flattened levels, each position its own query
    with its pixel centre as reference point on every level; `level_embed` tells levels apart."""

    def __init__(self, dim: int, heads: int, levels: int, points: int, ffn_dim: int,
                 num_layers: int, dropout: float) -> None:
        super().__init__()
        self.level_embed = nn.Parameter(torch.empty(levels, dim))
        nn.init.normal_(self.level_embed)
        self.encoder = nn.Module()  # keeps the official "transformer.encoder.layers.N" names
        self.encoder.layers = nn.ModuleList(
            DeformableEncoderLayer(dim, heads, levels, points, ffn_dim, dropout) for _ in range(num_layers))

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        shapes = [(int(f.shape[-2]), int(f.shape[-1])) for f in features]
        x = torch.cat([f.flatten(2).transpose(1, 2) for f in features], dim=1)
        pos = torch.cat([(sine_position_embedding(f, f.shape[1] // 2).flatten(2).transpose(1, 2)
                          + self.level_embed[i]) for i, f in enumerate(features)], dim=1)
        reference = _reference_points(shapes, x.device, x.dtype)[None].expand(x.shape[0], -1, -1, -1)
        for layer in self.encoder.layers:
            x = layer(x, pos, reference, shapes)
        return [level.transpose(1, 2).reshape(x.shape[0], -1, h, w)
                for level, (h, w) in zip(x.split([h * w for h, w in shapes], dim=1), shapes)]


def _reference_points(shapes: list[tuple[int, int]], device: torch.device, dtype: torch.dtype
                      ) -> torch.Tensor:
    """(S, levels, 2): each flattened position's pixel centre (x, y) in [0, 1], the same relative
    point on every level."""
    points, work = [], torch.promote_types(dtype, torch.float32)
    for h, w in shapes:
        ys = (torch.arange(h, device=device, dtype=work) + 0.5) / h
        xs = (torch.arange(w, device=device, dtype=work) + 0.5) / w
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        points.append(torch.stack([grid_x.flatten(), grid_y.flatten()], dim=-1))
    return torch.cat(points)[:, None, :].expand(-1, len(shapes), -1).to(dtype)


class MSDeformAttnPixelDecoder(nn.Module):
    """The paper's pixel decoder. forward(features at strides 4, 8, 16, 32) -> (mask features
    (N, mask_dim, H/4, W/4), [levels at strides 32, 16, 8], each (N, dim, h, w))."""

    def __init__(self, in_channels: Sequence[int], dim: int = 256, mask_dim: int = 256,
                 heads: int = 8, points: int = 4, ffn_dim: int = 1024, num_layers: int = 6,
                 dropout: float = 0.0) -> None:
        super().__init__()
        if len(in_channels) != 4:
            raise ValueError(f"Mask2Former's pixel decoder takes 4 backbone levels (strides 4..32); "
                             f"got {len(in_channels)} ({list(in_channels)})")
        # Coarsest first, as the official order (res5, res4, res3).
        self.input_proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, dim, 1), nn.GroupNorm(GROUPS, dim)) for c in in_channels[:0:-1])
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.zeros_(proj[0].bias)
        self.transformer = DeformableEncoder(dim, heads, 3, points, ffn_dim, num_layers, dropout)
        self.adapter_1 = ConvGN(in_channels[0], dim, 1, relu=False)
        self.layer_1 = ConvGN(dim, dim, 3, relu=True)
        self.mask_features = nn.Conv2d(dim, mask_dim, 1)
        nn.init.kaiming_uniform_(self.mask_features.weight, a=1)
        nn.init.zeros_(self.mask_features.bias)

    def forward(self, features: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        # float32 under autocast, as the official decoder: sampling offsets are fractions of a
        # pixel on maps up to 1/8 of the image, and fp16 would round them (its NaN risk too).
        with torch.autocast(features[0].device.type, enabled=False):
            return self._decode([f.float() if f.dtype in (torch.float16, torch.bfloat16) else f
                                 for f in features])

    def _decode(self, features: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        coarse = [proj(x) for proj, x in zip(self.input_proj, features[:0:-1])]
        levels = self.transformer(coarse)
        fine = self.adapter_1(features[0])
        fine = self.layer_1(fine + F.interpolate(levels[-1], size=fine.shape[-2:], mode="bilinear",
                                                 align_corners=False))
        return self.mask_features(fine), levels


class FPNPixelDecoder(nn.Module):
    """MaskFormer's plain FPN pixel decoder: lateral 1x1 and output 3x3 convs (GroupNorm) top-down;
    the same outputs as MSDeformAttnPixelDecoder at a fraction of its cost."""

    def __init__(self, in_channels: Sequence[int], dim: int = 256, mask_dim: int = 256) -> None:
        super().__init__()
        if len(in_channels) != 4:
            raise ValueError(f"Mask2Former's pixel decoder takes 4 backbone levels (strides 4..32); "
                             f"got {len(in_channels)} ({list(in_channels)})")
        self.lateral = nn.ModuleList(ConvGN(c, dim, 1, relu=False) for c in in_channels[:-1])
        self.top = ConvGN(in_channels[-1], dim, 3, relu=True)
        self.output = nn.ModuleList(ConvGN(dim, dim, 3, relu=True) for _ in in_channels[:-1])
        self.mask_features = nn.Conv2d(dim, mask_dim, 3, padding=1)
        nn.init.kaiming_uniform_(self.mask_features.weight, a=1)
        nn.init.zeros_(self.mask_features.bias)

    def forward(self, features: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        y = self.top(features[-1])
        levels = [y]
        for i in range(len(features) - 2, -1, -1):
            lateral = self.lateral[i](features[i])
            y = self.output[i](lateral + F.interpolate(y, size=lateral.shape[-2:], mode="nearest"))
            levels.append(y)
        return self.mask_features(y), levels[:3]
