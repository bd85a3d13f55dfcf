"""Deformable encoders: the standard one and Lite DETR's interleaved one.

Both run the same :class:`EncoderLayer`. They differ in one thing only, ``query_levels``: for each
layer, the first level whose tokens are queries (tokens are ordered finest level first, so the
queries are always a suffix of the sequence). Keys and values are always the whole current
multi-scale sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from litedetr.nn.attention import KeyAwareOptions, MultiScaleDeformableAttention
from litedetr.ops import encoder_reference_points
from litedetr.ops.geometry import SpatialShapes, level_shapes, level_starts

__all__ = ["FFN", "EncoderLayer", "DeformableEncoder", "LiteEncoder", "LayerQueries"]


class FFN(nn.Module):
    """Position-wise feed-forward block with residual and post-norm: ``norm(x + W2 relu(W1 x))``."""

    def __init__(self, d_model: int, d_ffn: int, dropout: float = 0.0):
        super().__init__()
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, N, C)`` -> ``(B, N, C)``."""
        return self.norm(x + self.dropout(self.linear2(self.dropout(self.linear1(x).relu()))))


class EncoderLayer(nn.Module):
    """Deformable self-attention of the query tokens over all tokens, then an FFN.

    With ``d_ffn_low`` set, the layer has a second, narrow FFN that the first ``n_low`` query tokens
    (the low-level ones) go through instead of the normal one (Lite DETR's all-token layer).
    """

    def __init__(
        self,
        d_model: int = 256,
        n_levels: int = 4,
        n_heads: int = 8,
        n_points: int = 4,
        d_ffn: int = 1024,
        dropout: float = 0.0,
        key_aware: bool = False,
        d_ffn_low: int | None = None,
        kda: KeyAwareOptions = KeyAwareOptions(),
    ):
        super().__init__()
        self.self_attn = MultiScaleDeformableAttention(d_model, n_levels, n_heads, n_points, key_aware, kda)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(d_model)
        self.ffn = FFN(d_model, d_ffn, dropout)
        self.ffn_low = FFN(d_model, d_ffn_low, dropout) if d_ffn_low is not None else None

    def forward(
        self,
        query: Tensor,
        query_pos: Tensor,
        reference_points: Tensor,
        src: Tensor,
        spatial_shapes: SpatialShapes,
        padding_mask: Tensor | None,
        n_low: int = 0,
    ) -> Tensor:
        """
        Args:
            query: ``(B, Lq, C)`` the tokens being updated (a suffix of ``src``).
            query_pos: ``(B, Lq, C)`` their position + level embeddings.
            reference_points: ``(B, Lq, L, 2)``.
            src: ``(B, S, C)`` all tokens (keys and values).
            spatial_shapes: ``(H_l, W_l)`` per level (a tuple of int pairs, or an ``(L, 2)`` tensor).
            padding_mask: ``(B, S)`` True = padding.
            n_low: how many leading query tokens take the narrow FFN (needs ``d_ffn_low``).

        Returns:
            ``(B, Lq, C)`` updated query tokens.
        """
        x = self.norm(query + self.dropout(self.self_attn(query + query_pos, reference_points, src, spatial_shapes, padding_mask)))
        if not n_low:
            return self.ffn(x)
        if self.ffn_low is None:
            raise ValueError("n_low > 0 needs a layer built with d_ffn_low")
        return torch.cat([self.ffn_low(x[:, :n_low]), self.ffn(x[:, n_low:])], 1)


@dataclass(frozen=True)
class LayerQueries:
    """Which tokens one encoder layer updates: levels ``first_level..L-1``."""

    layer: int
    first_level: int
    num_queries: int
    num_tokens: int
    narrow_ffn_tokens: int


class DeformableEncoder(nn.Module):
    """The standard deformable encoder: every token is a query in every layer.

    Args:
        num_layers: encoder depth.
        d_model, n_levels, n_heads, n_points: attention sizes.
        d_ffn: FFN width.
        dropout: dropout in attention residual and FFN.
        key_aware: KDA instead of plain deformable attention.
        kda: :class:`~litedetr.nn.attention.KeyAwareOptions` of the KDA layers.
    """

    def __init__(
        self,
        num_layers: int = 6,
        d_model: int = 256,
        n_levels: int = 4,
        n_heads: int = 8,
        n_points: int = 4,
        d_ffn: int = 1024,
        dropout: float = 0.0,
        key_aware: bool = False,
        kda: KeyAwareOptions = KeyAwareOptions(),
    ):
        super().__init__()
        self.n_levels = n_levels
        self.layers = nn.ModuleList(EncoderLayer(d_model, n_levels, n_heads, n_points, d_ffn, dropout, key_aware, kda=kda) for _ in range(num_layers))
        self.query_levels: list[int] = [0] * num_layers
        self.low_ffn_levels = 0

    def schedule(self, spatial_shapes: SpatialShapes) -> list[LayerQueries]:
        """Per layer, which levels are queries, how many tokens that is, and how many take the narrow FFN."""
        sizes = [h * w for h, w in level_shapes(spatial_shapes)]
        total = sum(sizes)
        out = []
        for i, (first, layer) in enumerate(zip(self.query_levels, self.layers)):
            narrow = sum(sizes[: self.low_ffn_levels]) if first == 0 and layer.ffn_low is not None else 0
            out.append(LayerQueries(i, first, sum(sizes[first:]), total, narrow))
        return out

    def forward(self, src: Tensor, pos: Tensor, spatial_shapes: SpatialShapes, valid_ratios: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """
        Args:
            src: ``(B, S, C)`` flattened multi-scale tokens, finest level first.
            pos: ``(B, S, C)`` position + level embeddings.
            spatial_shapes: ``(H_l, W_l)`` per level: a tuple of int pairs (:data:`~litedetr.ops.geometry.LevelShapes`,
                as the input stage makes them; no device sync, no graph break) or an ``(L, 2)`` tensor (read once).
            valid_ratios: ``(B, L, 2)``.
            padding_mask: ``(B, S)`` True = padding.

        Returns:
            ``(B, S, C)`` encoded tokens.
        """
        shapes = level_shapes(spatial_shapes)
        reference_points = encoder_reference_points(shapes, valid_ratios)
        starts = level_starts(shapes)
        for layer, step in zip(self.layers, self.schedule(shapes)):
            start = starts[step.first_level]
            queries = layer(src[:, start:], pos[:, start:], reference_points[:, start:], src, shapes, padding_mask, step.narrow_ffn_tokens)
            src = torch.cat([src[:, :start], queries], 1) if start else queries
        return src


class LiteEncoder(DeformableEncoder):
    """Lite DETR's interleaved encoder, ``H{n_high}L{n_levels-n_high}-(A+1)xB``.

    ``B`` blocks, each of ``A-1`` high-level-only layers (queries = the ``n_high`` coarsest levels;
    keys/values = the whole current sequence, low-level part as the last all-token layer left it)
    followed by one all-token layer in which the low-level tokens take a narrow FFN of width
    ``d_ffn_low`` (``None``: the normal FFN). ``A * B`` layers in all.

    This follows the authors' code, which differs from the paper's text: the paper describes
    ``A`` high-level updates followed by a separate low-level update per block; the code instead
    makes the block's last layer an all-token layer that also updates the high-level tokens (so
    they are updated ``A`` times per block, and low-level tokens once), with ``A * B = 6`` layers.
    """

    def __init__(
        self,
        n_high: int = 3,
        high_updates: int = 2,
        blocks: int = 3,
        d_model: int = 256,
        n_levels: int = 4,
        n_heads: int = 8,
        n_points: int = 4,
        d_ffn: int = 1024,
        d_ffn_low: int | None = 256,
        dropout: float = 0.0,
        key_aware: bool = True,
        kda: KeyAwareOptions = KeyAwareOptions(),
    ):
        if not 0 < n_high < n_levels:
            raise ValueError(f"n_high must be in 1..{n_levels - 1}, got {n_high}")
        if high_updates < 1 or blocks < 1:
            raise ValueError(f"A (high_updates) and B (blocks) must be >= 1, got A={high_updates}, B={blocks}")
        super().__init__(0, d_model, n_levels, n_heads, n_points, d_ffn, dropout, key_aware, kda)
        self.n_high, self.high_updates, self.blocks = n_high, high_updates, blocks
        self.low_ffn_levels = n_levels - n_high
        for _ in range(blocks):
            for _ in range(high_updates - 1):
                self.layers.append(EncoderLayer(d_model, n_levels, n_heads, n_points, d_ffn, dropout, key_aware, kda=kda))
                self.query_levels.append(self.low_ffn_levels)
            self.layers.append(EncoderLayer(d_model, n_levels, n_heads, n_points, d_ffn, dropout, key_aware, d_ffn_low, kda))
            self.query_levels.append(0)
