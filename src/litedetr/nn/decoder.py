"""Deformable decoder with iterative box refinement (DINO's decoder; also used for Deformable DETR and H-DETR)."""

from __future__ import annotations

from torch import Tensor, nn

from litedetr.nn.attention import MultiScaleDeformableAttention
from litedetr.nn.encoder import FFN
from litedetr.ops import box_sine_embedding, inverse_sigmoid

__all__ = ["MLP", "DecoderLayer", "DeformableDecoder", "DINO_INVERSE_SIGMOID_EPS"]

DINO_INVERSE_SIGMOID_EPS = 1e-3
"""DINO clamps probabilities to ``[1e-3, 1 - 1e-3]`` before the inverse sigmoid of reference boxes."""


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
    ):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.norm_self = nn.LayerNorm(d_model)
        self.cross_attn = MultiScaleDeformableAttention(d_model, n_levels, n_heads, n_points, key_aware)
        self.norm_cross = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.ffn = FFN(d_model, d_ffn, dropout)

    def forward(
        self,
        tgt: Tensor,
        query_pos: Tensor,
        reference_boxes: Tensor,
        memory: Tensor,
        spatial_shapes: Tensor,
        memory_padding_mask: Tensor | None,
        self_attn_mask: Tensor | None = None,
    ) -> Tensor:
        """
        Args:
            tgt: ``(B, Q, C)`` query content.
            query_pos: ``(B, Q, C)`` query position embedding.
            reference_boxes: ``(B, Q, L, 4)`` normalised ``cxcywh`` per level.
            memory: ``(B, S, C)`` encoder output.
            spatial_shapes: ``(L, 2)``.
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


class DeformableDecoder(nn.Module):
    """Decoder layers refining reference boxes layer by layer.

    Each layer's query position is an MLP of the sine embedding of its current reference box (DINO);
    after each layer ``bbox_head`` predicts a box delta in inverse-sigmoid space. The next layer's
    reference is the refined box with gradients stopped. With ``look_forward_twice`` (DINO) the
    returned boxes keep their gradient through the previous layer's refinement; otherwise they are
    the stopped references (Deformable DETR's iterative refinement).
    """

    def __init__(
        self,
        num_layers: int = 6,
        d_model: int = 256,
        n_levels: int = 4,
        n_heads: int = 8,
        n_points: int = 4,
        d_ffn: int = 2048,
        dropout: float = 0.0,
        key_aware: bool = False,
    ):
        super().__init__()
        self.layers = nn.ModuleList(
            DecoderLayer(d_model, n_levels, n_heads, n_points, d_ffn, dropout, key_aware) for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(d_model)
        self.ref_point_head = MLP(2 * d_model, d_model, d_model, 2)
        self.d_model = d_model

    def forward(
        self,
        tgt: Tensor,
        reference_logits: Tensor,
        memory: Tensor,
        spatial_shapes: Tensor,
        valid_ratios: Tensor,
        memory_padding_mask: Tensor | None,
        bbox_head: nn.Module,
        self_attn_mask: Tensor | None = None,
        look_forward_twice: bool = True,
    ) -> tuple[list[Tensor], list[Tensor]]:
        """
        Args:
            tgt: ``(B, Q, C)`` initial query content.
            reference_logits: ``(B, Q, 4)`` initial boxes, inverse-sigmoid ``cxcywh``.
            memory: ``(B, S, C)``; spatial_shapes ``(L, 2)``; valid_ratios ``(B, L, 2)``.
            memory_padding_mask: ``(B, S)`` True = padding.
            bbox_head: maps ``(B, Q, C)`` to a ``(B, Q, 4)`` box delta.
            self_attn_mask: ``(Q, Q)`` bool, True = blocked.

        Returns:
            ``hidden``: per layer ``(B, Q, C)`` normalised outputs; ``references``: per layer
            ``(B, Q, 4)`` sigmoid boxes the layer's prediction is relative to (``len(layers)`` of them).
        """
        reference = reference_logits.sigmoid()
        box_ratios = valid_ratios.repeat(1, 1, 2)[:, None]  # (B, 1, L, 4)
        hidden, references = [], [reference]
        for i, layer in enumerate(self.layers):
            boxes_per_level = reference[:, :, None] * box_ratios
            query_pos = self.ref_point_head(box_sine_embedding(boxes_per_level[:, :, 0], self.d_model // 2))
            tgt = layer(tgt, query_pos, boxes_per_level, memory, spatial_shapes, memory_padding_mask, self_attn_mask)
            hidden.append(self.norm(tgt))
            refined = (bbox_head(tgt) + inverse_sigmoid(reference, DINO_INVERSE_SIGMOID_EPS)).sigmoid()
            reference = refined.detach()
            if i < len(self.layers) - 1:
                references.append(refined if look_forward_twice else reference)
        return hidden, references
