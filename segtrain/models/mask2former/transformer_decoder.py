"""Mask2Former's transformer decoder (Cheng et al., 2022, section 3.2): learnable queries attend to
one pixel-decoder level per layer, round-robin from the coarsest, with *masked* attention (each
query sees only the pixels of its previous layer's mask); every layer's queries predict classes
and masks (deep supervision). Post-norm layers, parameter names as the official implementation.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from segtrain.models.mask2former.pixel_decoder import sine_position_embedding


class AttentionLayer(nn.Module):
    """Residual multi-head attention then LayerNorm; positional embeddings added to queries and keys."""

    def __init__(self, dim: int, heads: int, dropout: float, cross: bool) -> None:
        super().__init__()
        attention = nn.MultiheadAttention(dim, heads, dropout=dropout)
        # The official names: "multihead_attn" for cross-attention, "self_attn" for self-attention.
        self.attention_name = "multihead_attn" if cross else "self_attn"
        setattr(self, self.attention_name, attention)
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        for p in attention.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, x: torch.Tensor, query_pos: torch.Tensor, memory: torch.Tensor | None = None,
                pos: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (Q, N, dim); memory (S, N, dim) for cross-attention (None: self-attention); mask
        (N * heads, Q, S) True where a query must not look."""
        query = x + query_pos
        attention = getattr(self, self.attention_name)
        if memory is None:
            out = attention(query, query, x, need_weights=False)[0]
        else:
            out = attention(query, memory + pos, memory, attn_mask=mask, need_weights=False)[0]
        return self.norm(x + self.dropout(out))


class FFNLayer(nn.Module):
    def __init__(self, dim: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.linear1 = nn.Linear(dim, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.dropout(self.linear2(self.dropout(F.relu(self.linear1(x))))))


class MLP(nn.Module):
    """`num_layers` Linear layers with ReLU between them (the mask embedding head)."""

    def __init__(self, dim: int, hidden: int, out: int, num_layers: int) -> None:
        super().__init__()
        sizes = [dim] + [hidden] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes, sizes[1:] + [out]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


class MaskedAttentionDecoder(nn.Module):
    """forward(levels [strides 32, 16, 8], mask_features (N, mask_dim, H/4, W/4)) ->
    {"pred_logits" (N, Q, num_classes + 1), "pred_masks" (N, Q, H/4, W/4) logits, "aux_outputs":
    the same pair for the query predictions before the last layer (dec_layers entries: the
    learned queries' own, then after each layer but the last)}.

    `dec_layers` counts as the official config does: dec_layers - 1 attention layers (9 of 10).
    """

    def __init__(self, num_classes: int, in_channels: int = 256, hidden_dim: int = 256,
                 num_queries: int = 100, heads: int = 8, ffn_dim: int = 2048, dec_layers: int = 10,
                 mask_dim: int = 256, dropout: float = 0.0, levels: int = 3) -> None:
        super().__init__()
        if dec_layers < 2:
            raise ValueError(f"model.dec_layers={dec_layers}; expected >= 2 (the official count: "
                             "dec_layers - 1 attention layers)")
        self.num_heads, self.levels, self.hidden_dim = heads, levels, hidden_dim
        layers = dec_layers - 1
        self.transformer_cross_attention_layers = nn.ModuleList(
            AttentionLayer(hidden_dim, heads, dropout, cross=True) for _ in range(layers))
        self.transformer_self_attention_layers = nn.ModuleList(
            AttentionLayer(hidden_dim, heads, dropout, cross=False) for _ in range(layers))
        self.transformer_ffn_layers = nn.ModuleList(FFNLayer(hidden_dim, ffn_dim, dropout)
                                                    for _ in range(layers))
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        self.query_feat = nn.Embedding(num_queries, hidden_dim)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.level_embed = nn.Embedding(levels, hidden_dim)
        self.input_proj = nn.ModuleList(
            nn.Identity() if in_channels == hidden_dim else nn.Conv2d(in_channels, hidden_dim, 1)
            for _ in range(levels))
        for proj in self.input_proj:
            if isinstance(proj, nn.Conv2d):  # detectron2's c2_xavier_fill, as the official
                nn.init.kaiming_uniform_(proj.weight, a=1)
                nn.init.zeros_(proj.bias)
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)

    def forward(self, levels: list[torch.Tensor], mask_features: torch.Tensor) -> dict[str, Any]:
        batch = mask_features.shape[0]
        sources, positions, sizes = [], [], []
        for i, x in enumerate(levels[: self.levels]):
            sizes.append(tuple(x.shape[-2:]))
            # hidden_dim channels whatever the level's (the official pe_layer: N_steps = hidden_dim // 2)
            positions.append(sine_position_embedding(x, self.hidden_dim // 2).flatten(2).permute(2, 0, 1))
            sources.append((self.input_proj[i](x).flatten(2) + self.level_embed.weight[i][None, :, None])
                           .permute(2, 0, 1))
        # repeat, not expand: an expanded view of a parameter made under no_grad has no grad_fn,
        # which FlopCounterMode's module tracker (model-info) cannot handle.
        query_pos = self.query_embed.weight[:, None].repeat(1, batch, 1)
        x = self.query_feat.weight[:, None].repeat(1, batch, 1)
        logits, masks, attn_mask = self._predict(x, mask_features, sizes[0])
        predictions = [(logits, masks)]
        for i, (cross, self_attn, ffn) in enumerate(zip(self.transformer_cross_attention_layers,
                                                        self.transformer_self_attention_layers,
                                                        self.transformer_ffn_layers)):
            level = i % self.levels
            x = cross(x, query_pos, sources[level], positions[level], attn_mask)
            x = ffn(self_attn(x, query_pos))
            logits, masks, attn_mask = self._predict(x, mask_features, sizes[(i + 1) % self.levels])
            predictions.append((logits, masks))
        return {"pred_logits": logits, "pred_masks": masks,
                "aux_outputs": [{"pred_logits": lg, "pred_masks": m} for lg, m in predictions[:-1]]}

    def _predict(self, x: torch.Tensor, mask_features: torch.Tensor, size: tuple[int, int]
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Class logits, mask logits and the next layer's attention mask (True = not attended:
        the query's mask probability there is below 0.5; a query whose mask is empty at that
        level attends everywhere instead of nowhere)."""
        out = self.decoder_norm(x).transpose(0, 1)
        logits = self.class_embed(out)
        masks = torch.einsum("bqc,bchw->bqhw", self.mask_embed(out), mask_features)
        with torch.no_grad():
            attn = F.interpolate(masks, size=size, mode="bilinear", align_corners=False)
            attn = attn.sigmoid().flatten(2) < 0.5  # (N, Q, S)
            attn[attn.all(-1)] = False
            attn = attn.repeat_interleave(self.num_heads, dim=0)  # (N * heads, Q, S), batch-major
        return logits, masks, attn
