"""Multi-scale deformable attention (Zhu et al., Deformable DETR, 2021) with `grid_sample`.

The official CUDA kernel and this function compute the same thing; this is the reference
implementation's own PyTorch fallback, so it runs on any device and exports without a custom op.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def ms_deform_attn(value: torch.Tensor, shapes: list[tuple[int, int]], locations: torch.Tensor,
                   weights: torch.Tensor) -> torch.Tensor:
    """Sample each level's values at `locations` and sum them with `weights`.

    value: (N, S, M, D), the S = sum(h * w) flattened positions of every level, M heads of D
        channels; shapes: each level's (h, w), finest first, in `value`'s order.
    locations: (N, Q, M, L, P, 2), x and y in [0, 1] relative to each level (0 and 1 are the
        outer edges of the border pixels); outside, values are zero.
    weights: (N, Q, M, L, P), normally softmax-ed over L * P.
    Returns (N, Q, M * D).
    """
    batch, _, heads, dim = value.shape
    _, queries, _, levels, points, _ = locations.shape
    per_level = value.split([h * w for h, w in shapes], dim=1)
    grids = 2 * locations - 1  # grid_sample's [-1, 1]; align_corners=False matches the edges above
    sampled = []
    for level, (h, w) in enumerate(shapes):
        # (N, h*w, M, D) -> (N*M, D, h, w)
        v = per_level[level].flatten(2).transpose(1, 2).reshape(batch * heads, dim, h, w)
        # (N, Q, M, P, 2) -> (N*M, Q, P, 2)
        grid = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        sampled.append(F.grid_sample(v, grid, mode="bilinear", padding_mode="zeros", align_corners=False))
    # (N*M, D, Q, L*P) weighted by (N*M, 1, Q, L*P)
    stacked = torch.stack(sampled, dim=-2).flatten(-2)
    w = weights.transpose(1, 2).reshape(batch * heads, 1, queries, levels * points)
    out = (stacked * w).sum(-1).view(batch, heads * dim, queries)
    return out.transpose(1, 2).contiguous()


class MSDeformAttn(nn.Module):
    """Deformable attention over `levels` feature maps: each query looks at `points` learned
    offsets around its reference point in every level, per head (the paper's defaults: 8 heads,
    4 levels, 4 points)."""

    def __init__(self, dim: int = 256, levels: int = 4, heads: int = 8, points: int = 4) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"MSDeformAttn: dim={dim} is not divisible by heads={heads}")
        self.dim, self.levels, self.heads, self.points = dim, levels, heads, points
        self.sampling_offsets = nn.Linear(dim, heads * levels * points * 2)
        self.attention_weights = nn.Linear(dim, heads * levels * points)
        self.value_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The paper's init: offsets start on a ring of directions, one per head, growing with
        the point index; uniform attention; Xavier projections."""
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.heads, dtype=torch.float32) * (2 * math.pi / self.heads)
        ring = torch.stack([angles.cos(), angles.sin()], -1)
        ring = ring / ring.abs().max(-1, keepdim=True).values
        ring = ring.view(self.heads, 1, 1, 2).repeat(1, self.levels, self.points, 1)
        ring *= torch.arange(1, self.points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(ring.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for proj in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)

    def forward(self, query: torch.Tensor, reference: torch.Tensor, value: torch.Tensor,
                shapes: list[tuple[int, int]], padding: torch.Tensor | None = None) -> torch.Tensor:
        """query (N, Q, dim); reference (N, Q, levels, 2) points in [0, 1] per level; value
        (N, S, dim) the flattened levels of `shapes`; padding (N, S) True where `value` is padding.
        Returns (N, Q, dim)."""
        batch, queries, _ = query.shape
        if sum(h * w for h, w in shapes) != value.shape[1]:
            raise ValueError(f"MSDeformAttn: value has {value.shape[1]} positions, shapes {shapes} "
                             f"give {sum(h * w for h, w in shapes)}")
        v = self.value_proj(value)
        if padding is not None:
            v = v.masked_fill(padding[..., None], 0.0)
        v = v.view(batch, -1, self.heads, self.dim // self.heads)
        offsets = self.sampling_offsets(query).view(batch, queries, self.heads, self.levels, self.points, 2)
        weights = self.attention_weights(query).view(batch, queries, self.heads, self.levels * self.points)
        weights = weights.softmax(-1).view(batch, queries, self.heads, self.levels, self.points)
        # Offsets are in pixels of each level: normalise by its (w, h).
        normaliser = torch.tensor([[w, h] for h, w in shapes], dtype=query.dtype, device=query.device)
        locations = reference[:, :, None, :, None, :] + offsets / normaliser[None, None, None, :, None, :]
        return self.output_proj(ms_deform_attn(v, shapes, locations, weights))
