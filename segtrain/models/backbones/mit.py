"""SegFormer's Mix Transformer encoders MiT-B0..B5 (Xie et al., 2021), as a `Backbone`.

Layer names follow the official NVlabs code (`patch_embed1`, `block1.0.attn.q`, `norm1`, ...), so
its ImageNet files (mit_b0.pth ...) load as they are, their classifier `head.` ignored.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import StochasticDepth

from segtrain.models.backbones.common import (
    STRIDES,
    Backbone,
    check_frozen_stages,
    check_out_indices,
    check_output_stride,
)
from segtrain.models.weights import load_matching, load_state_dict_from_spec

HEADS = (1, 2, 5, 8)
SR_RATIOS = (8, 4, 2, 1)  # spatial reduction of keys/values per stage
MLP_RATIO = 4
NORM_EPS = 1e-6  # the blocks' and stages' LayerNorms; the embeddings' use PyTorch's 1e-5 (as NVlabs)


@dataclass(frozen=True)
class MitVariant:
    embed_dims: tuple[int, int, int, int]
    depths: tuple[int, int, int, int]


_WIDE = (64, 128, 320, 512)
VARIANTS = {
    "mit_b0": MitVariant((32, 64, 160, 256), (2, 2, 2, 2)),
    "mit_b1": MitVariant(_WIDE, (2, 2, 2, 2)),
    "mit_b2": MitVariant(_WIDE, (3, 4, 6, 3)),
    "mit_b3": MitVariant(_WIDE, (3, 4, 18, 3)),
    "mit_b4": MitVariant(_WIDE, (3, 8, 27, 3)),
    "mit_b5": MitVariant(_WIDE, (3, 6, 40, 3)),
}


class OverlapPatchEmbed(nn.Module):
    """Strided conv whose kernel overlaps its neighbours (7x7/4 first, 3x3/2 after), then LayerNorm."""

    def __init__(self, in_channels: int, dim: int, kernel: int, stride: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel, stride=stride, padding=kernel // 2)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """x (N, C_in, H, W) -> tokens (N, h*w, dim), h, w."""
        x = self.proj(x)
        height, width = x.shape[-2:]
        return self.norm(x.flatten(2).transpose(1, 2)), height, width


class EfficientSelfAttention(nn.Module):
    """Multi-head attention whose keys and values come from a map shrunk `sr_ratio` times per side
    (a conv with kernel = stride = sr_ratio): the cost falls by sr_ratio**2 at high resolution."""

    def __init__(self, dim: int, heads: int, sr_ratio: int) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.sr_ratio = sr_ratio
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """x (N, height*width, dim) -> (N, height*width, dim)."""
        n, length, dim = x.shape
        q = self.q(x).reshape(n, length, self.heads, -1).transpose(1, 2)
        source = x
        if self.sr_ratio > 1:
            grid = x.transpose(1, 2).reshape(n, dim, height, width)
            source = self.norm(self.sr(grid).flatten(2).transpose(1, 2))
        k, v = self.kv(source).reshape(n, -1, 2, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(n, length, dim))


class DepthwiseConv(nn.Module):
    """3x3 depthwise conv on tokens; it gives Mix-FFN the position cues a ViT gets from embeddings."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        n, _, dim = x.shape
        grid = x.transpose(1, 2).reshape(n, dim, height, width)
        return self.dwconv(grid).flatten(2).transpose(1, 2)


class MixFFN(nn.Module):
    """fc -> 3x3 depthwise conv -> GELU -> fc, hidden width MLP_RATIO * dim."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        hidden = MLP_RATIO * dim
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = DepthwiseConv(hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return self.fc2(self.act(self.dwconv(self.fc1(x), height, width)))


class MitBlock(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + MixFFN(norm(x)), each with
    stochastic depth."""

    def __init__(self, dim: int, heads: int, sr_ratio: int, drop_path: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=NORM_EPS)
        self.attn = EfficientSelfAttention(dim, heads, sr_ratio)
        self.norm2 = nn.LayerNorm(dim, eps=NORM_EPS)
        self.mlp = MixFFN(dim)
        self.drop_path = StochasticDepth(drop_path, mode="row")

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), height, width))
        return x + self.drop_path(self.mlp(self.norm2(x), height, width))


class MixTransformer(Backbone):
    """MiT-B0..B5: four stages of overlapping patch embedding, `depths[i]` blocks and a LayerNorm,
    at strides 4, 8, 16, 32; channels `embed_dims` (B0: 32, 64, 160, 256; B1..B5: 64, 128, 320, 512).

    forward(x float (N, 3, H, W), any H, W >= 32) -> NCHW maps, finest first; a map is
    ceil(H / stride) x ceil(W / stride). frozen_stages 0 freezes the first patch embedding (the
    stem), k also stages 1..k. drop_path_rate (default 0.1, the paper's) grows linearly over blocks.
    """

    def __init__(self, name: str, out_indices: Sequence[int] | None = None, output_stride: int = 32,
                 frozen_stages: int = -1, frozen_bn: bool = False, weights: str | None = None,
                 drop_path_rate: float | None = None) -> None:
        super().__init__()
        if name not in VARIANTS:
            raise ValueError(f"model.backbone={name!r}; expected one of {', '.join(VARIANTS)}")
        check_output_stride(output_stride, name, dilatable=False)
        if frozen_bn:
            raise ValueError(f"model.frozen_bn=true: backbone {name} has no BatchNorm (it uses "
                             "LayerNorm); set model.frozen_bn=false")
        rate = 0.1 if drop_path_rate is None else float(drop_path_rate)
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"model.drop_path_rate={drop_path_rate!r}; expected 0 <= rate < 1")
        self.name = name
        variant = VARIANTS[name]
        dims, depths = variant.embed_dims, variant.depths
        rates = torch.linspace(0, rate, sum(depths)).tolist()
        for i in range(4):
            in_channels = 3 if i == 0 else dims[i - 1]
            kernel, stride = (7, 4) if i == 0 else (3, 2)
            setattr(self, f"patch_embed{i + 1}", OverlapPatchEmbed(in_channels, dims[i], kernel, stride))
            first = sum(depths[:i])
            setattr(self, f"block{i + 1}", nn.ModuleList(
                MitBlock(dims[i], HEADS[i], SR_RATIOS[i], rates[first + j]) for j in range(depths[i])))
            setattr(self, f"norm{i + 1}", nn.LayerNorm(dims[i], eps=NORM_EPS))
        self.apply(_init_weights)
        if weights is not None:
            self._load(weights)
        self.out_indices = check_out_indices(out_indices, len(STRIDES), name)
        self.channels = [dims[i] for i in self.out_indices]
        self.strides = [STRIDES[i] for i in self.out_indices]
        check_frozen_stages(frozen_stages, 4, name)
        # As torchvision's Swin: the first patch embedding is the stem, a later one starts its stage.
        frozen = ["patch_embed1"] if frozen_stages >= 0 else []
        for i in range(1, frozen_stages + 1):
            frozen += ([f"patch_embed{i}"] if i > 1 else []) + [f"block{i}", f"norm{i}"]
        self.freeze(frozen)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for i in range(self.out_indices[-1] + 1):  # deeper stages would be computed for nothing
            x, height, width = getattr(self, f"patch_embed{i + 1}")(x)
            for block in getattr(self, f"block{i + 1}"):
                x = block(x, height, width)
            x = getattr(self, f"norm{i + 1}")(x)
            x = x.transpose(1, 2).reshape(x.shape[0], -1, height, width).contiguous()
            features.append(x)
        return [features[i] for i in self.out_indices]

    def _load(self, weights: str) -> None:
        state_dict = load_state_dict_from_spec(weights, option="model.weights_backbone")
        load_matching(self, state_dict, ignore_prefixes=("head.",),
                      source=f"model.weights_backbone={weights}")


def _init_weights(module: nn.Module) -> None:
    """The official code's init: truncated normal (std 0.02) Linear, He fan-out normal convs."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv2d):
        fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
        nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
        if module.bias is not None:
            nn.init.zeros_(module.bias)
