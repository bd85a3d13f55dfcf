"""Deformable decoder with iterative box refinement, shared by Deformable DETR, DINO and H-DETR.

The families differ in the decoder's parts, not in its loop: where the query position comes from
(:class:`AnchorQueryPosition` or :class:`StaticQueryPosition`), the output norm, the inverse-sigmoid
clamp and whether references look forward once or twice.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from litedetr.nn.attention import KeyAwareOptions, MultiScaleDeformableAttention
from litedetr.nn.encoder import FFN
from litedetr.ops import box_sine_embedding, inverse_sigmoid
from litedetr.ops.geometry import SpatialShapes

__all__ = ["MLP", "DecoderLayer", "AnchorQueryPosition", "StaticQueryPosition", "DeformableDecoder"]


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else layer(x).relu()
        return x


class DecoderLayer(nn.Module):
    """Query self-attention, deformable cross-attention to the encoder memory, FFN (post-norm)."""

    def __init__(
        self,
        d_model: int = 256,
        n_levels: int = 4,
        n_heads: int = 8,
        n_points: int = 4,
        d_ffn: int = 2048,
        dropout: float = 0.0,
        key_aware: bool = False,
        kda: KeyAwareOptions = KeyAwareOptions(),
    ):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.norm_self = nn.LayerNorm(d_model)
        self.cross_attn = MultiScaleDeformableAttention(d_model, n_levels, n_heads, n_points, key_aware, kda)
        self.norm_cross = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.ffn = FFN(d_model, d_ffn, dropout)

    def forward(
        self,
        tgt: Tensor,
        query_pos: Tensor,
        reference_boxes: Tensor,
        memory: Tensor,
        spatial_shapes: SpatialShapes,
        memory_padding_mask: Tensor | None,
        self_attn_mask: Tensor | None = None,
    ) -> Tensor:
        """
        Args:
            tgt: ``(B, Q, C)`` query content.
            query_pos: ``(B, Q, C)`` query position embedding.
            reference_boxes: ``(B, Q, L, 4)`` normalised ``cxcywh`` per level.
            memory: ``(B, S, C)`` encoder output.
            spatial_shapes: ``(H_l, W_l)`` per level (a tuple of int pairs, or an ``(L, 2)`` tensor).
            memory_padding_mask: ``(B, S)`` True = padding.
            self_attn_mask: ``(Q, Q)`` bool, True = query may not attend.

        Returns:
            ``(B, Q, C)``.
        """
        q = tgt + query_pos
        tgt = self.norm_self(tgt + self.dropout(self.self_attn(q, q, tgt, attn_mask=self_attn_mask, need_weights=False)[0]))
        attended = self.cross_attn(tgt + query_pos, reference_boxes, memory, spatial_shapes, memory_padding_mask)
        tgt = self.norm_cross(tgt + self.dropout(attended))
        return self.ffn(tgt)


class AnchorQueryPosition(nn.Module):
    """DINO's query position, recomputed each layer: an MLP of the sine embedding of the layer's reference box."""

    def __init__(self, d_model: int = 256):
        super().__init__()
        self.mlp = MLP(2 * d_model, d_model, d_model, 2)
        self.d_model = d_model

    def forward(self, reference_boxes: Tensor, static_position: Tensor | None) -> Tensor:
        """``(B, Q, 4)`` boxes (scaled to the first level's valid area) -> ``(B, Q, C)``; ``static_position`` is unused."""
        return self.mlp(box_sine_embedding(reference_boxes, self.d_model // 2))


class StaticQueryPosition(nn.Module):
    """Two-stage Deformable DETR's / H-DETR's query position: fixed for all layers, made by the query selection."""

    def forward(self, reference_boxes: Tensor, static_position: Tensor | None) -> Tensor:
        """Returns ``static_position`` ``(B, Q, C)``."""
        if static_position is None:
            raise ValueError("this decoder takes its query positions from the query selection, and none was given")
        return static_position


class DeformableDecoder(nn.Module):
    """Decoder layers refining reference boxes layer by layer (iterative box refinement).

    Each layer's query position comes from ``query_position`` (:class:`AnchorQueryPosition`, DINO, or
    :class:`StaticQueryPosition`, Deformable DETR and H-DETR). After each layer, ``box_heads[i]``
    predicts a box delta in inverse-sigmoid space (clamped with ``inverse_sigmoid_eps``: DINO 1e-3,
    Deformable DETR and H-DETR 1e-5); the next layer's reference is the refined box with gradients
    stopped. With ``look_forward_twice`` (DINO, H-DETR) the returned references keep their gradient
    through the previous layer's refinement; otherwise they are the stopped ones (look forward once).
    ``norm`` is applied to each layer's returned output (DINO's decoder norm; ``nn.Identity`` in
    Deformable DETR and H-DETR).
    """

    def __init__(
        self,
        num_layers: int = 6,
        *,
        d_model: int = 256,
        n_levels: int = 4,
        n_heads: int = 8,
        n_points: int = 4,
        d_ffn: int = 2048,
        dropout: float = 0.0,
        key_aware: bool = False,
        kda: KeyAwareOptions = KeyAwareOptions(),
        query_position: nn.Module,
        norm: nn.Module,
        look_forward_twice: bool,
        inverse_sigmoid_eps: float,
    ):
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(d_model, n_levels, n_heads, n_points, d_ffn, dropout, key_aware, kda) for _ in range(num_layers))
        self.query_position = query_position
        self.norm = norm
        self.look_forward_twice = look_forward_twice
        self.inverse_sigmoid_eps = inverse_sigmoid_eps

    def forward(
        self,
        content: Tensor,
        reference: Tensor,
        static_position: Tensor | None,
        memory: Tensor,
        spatial_shapes: SpatialShapes,
        valid_ratios: Tensor,
        memory_padding_mask: Tensor | None,
        box_heads: Sequence[nn.Module],
        self_attn_mask: Tensor | None = None,
    ) -> tuple[list[Tensor], list[Tensor]]:
        """
        Args:
            content: ``(B, Q, C)`` initial query content.
            reference: ``(B, Q, 4)`` initial boxes, inverse-sigmoid ``cxcywh`` (as :class:`~litedetr.models.query_selection.DecoderQueries` holds them).
            static_position: ``(B, Q, C)`` query positions fixed for all layers, or None (:class:`AnchorQueryPosition`).
            memory: ``(B, S, C)``; spatial_shapes ``(H_l, W_l)`` per level; valid_ratios ``(B, L, 2)``.
            memory_padding_mask: ``(B, S)`` True = padding.
            box_heads: per layer, maps ``(B, Q, C)`` to a ``(B, Q, 4)`` box delta.
            self_attn_mask: ``(Q, Q)`` bool, True = blocked.

        Returns:
            ``hidden``: per layer ``(B, Q, C)`` outputs (after ``norm``); ``references``: per layer
            ``(B, Q, 4)`` sigmoid boxes the layer's prediction is relative to (``len(layers)`` of them).
        """
        if len(box_heads) != len(self.layers):
            raise ValueError(f"{len(box_heads)} box heads given for {len(self.layers)} decoder layers")
        reference = reference.sigmoid()
        tgt = content
        box_ratios = valid_ratios.repeat(1, 1, 2)[:, None]  # (B, 1, L, 4)
        hidden, references = [], [reference]
        for i, (layer, box_head) in enumerate(zip(self.layers, box_heads)):
            boxes_per_level = reference[:, :, None] * box_ratios
            query_pos = self.query_position(boxes_per_level[:, :, 0], static_position)
            tgt = layer(tgt, query_pos, boxes_per_level, memory, spatial_shapes, memory_padding_mask, self_attn_mask)
            hidden.append(self.norm(tgt))
            refined = (box_head(tgt) + inverse_sigmoid(reference, self.inverse_sigmoid_eps)).sigmoid()
            reference = refined.detach()
            if i < len(self.layers) - 1:
                references.append(refined if self.look_forward_twice else reference)
        return hidden, references
