"""Two-stage query selection: the encoder's tokens propose boxes, the top-k become decoder queries.

Every family first turns each encoder token into a proposal (:func:`~litedetr.ops.encoder_proposals`,
then ``enc_output`` + LayerNorm, a class head and a box head). They then differ:

- :class:`MixedQuerySelection` (DINO): the top-k tokens by their highest class logit give the
  anchors; the content is a learned embedding ("mixed query selection"). Only the selected
  proposals are supervised, with the real labels.
- :class:`BoxEmbeddingQuerySelection` (two-stage Deformable DETR, H-DETR): the top-k by the class-0
  logit; their boxes' sine embedding goes through ``pos_trans`` + LayerNorm, whose first half is the
  query position (fixed for all decoder layers) and whose second half the content (Deformable
  DETR), unless a learned content embedding replaces it (H-DETR's mixed selection). Every token's
  proposal is supervised, with binary targets.

With ``dense`` (training from scratch, not in any of the code bases) ``enc_outputs`` also carries
``dense``: every token's class logits and box, which the criterion supervises one-to-many
(:attr:`~litedetr.models.config.DetectorConfig.encoder_one_to_many`). With ``query_nms`` (neither) the
top-k passes over proposals that a higher-scoring one overlaps
(:attr:`~litedetr.models.config.DetectorConfig.query_nms`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from litedetr.models.heads import init_box_head, init_class_head
from litedetr.nn import MultiScaleTokens
from litedetr.nn.decoder import MLP
from litedetr.ops import box_cxcywh_to_xyxy, box_sine_embedding, distinct_topk, encoder_proposals

__all__ = ["DecoderQueries", "QuerySelection", "MixedQuerySelection", "BoxEmbeddingQuerySelection", "QUERY_NMS_CANDIDATES"]

QUERY_NMS_CANDIDATES = 4
"""With ``query_nms``, the ``4 x Q`` highest-scoring proposals are compared pairwise for the ``Q`` queries."""


@dataclass(frozen=True)
class DecoderQueries:
    """What the decoder starts from.

    Attributes:
        content: ``(B, Q, C)`` query content.
        reference: ``(B, Q, 4)`` initial reference boxes, inverse-sigmoid ``cxcywh``, without gradient.
        position: ``(B, Q, C)`` query positions fixed for all layers, or None (computed per layer).
        attn_mask: ``(Q, Q)`` bool self-attention mask, True = blocked; None: no mask.
        groups: the queries' roles as index ranges: ``one_to_one`` always, ``dn`` (denoising) and
            ``one_to_many`` when training parts added them.
        dn_meta: the denoising layout for the criterion, when there are denoising queries.
    """

    content: Tensor
    reference: Tensor
    position: Tensor | None
    attn_mask: Tensor | None = None
    groups: dict[str, slice] = field(default_factory=dict)
    dn_meta: dict[str, int] | None = None


def _gather(x: Tensor, index: Tensor) -> Tensor:
    """``(B, S, C)`` rows picked by ``(B, K)`` indices -> ``(B, K, C)``."""
    return torch.gather(x, 1, index[..., None].expand(-1, -1, x.shape[-1]))


class QuerySelection(nn.Module):
    """The encoder-output head every family shares: per-token proposals, their class logits and boxes.

    Args:
        d_model: token channels.
        num_classes: ``K``.
        num_content: rows of the learned content embedding (the one-to-one queries plus any
            training-only ones), or None when the content does not come from an embedding.
        dense: in training, also return every token's proposal (``enc_outputs["dense"]``).
        query_nms: IoU above which :meth:`select` passes over a proposal that a higher-scoring one
            overlaps; None: plain top-k.
    """

    def __init__(self, d_model: int, num_classes: int, num_content: int | None, dense: bool = False, query_nms: float | None = None):
        super().__init__()
        self.dense = dense
        self.query_nms = query_nms
        self.enc_output = nn.Linear(d_model, d_model)
        self.enc_output_norm = nn.LayerNorm(d_model)
        self.class_head = nn.Linear(d_model, num_classes)
        self.box_head = MLP(d_model, d_model, 4, 3)
        self.content = nn.Embedding(num_content, d_model) if num_content is not None else None
        nn.init.xavier_uniform_(self.enc_output.weight)
        init_class_head(self.class_head)
        init_box_head(self.box_head)
        if self.content is not None:
            nn.init.normal_(self.content.weight)

    def proposals(self, memory: Tensor, tokens: MultiScaleTokens, num_queries: int) -> tuple[Tensor, Tensor]:
        """``(B, S, C)`` proposal features (``enc_output`` + norm) and ``(B, S, 4)`` inverse-sigmoid proposals."""
        if memory.shape[1] < num_queries:
            raise ValueError(f"the image gives {memory.shape[1]} encoder tokens, fewer than the {num_queries} queries to select")
        proposal_memory, proposals = encoder_proposals(memory, tokens.padding_mask, tokens.spatial_shapes)
        return self.enc_output_norm(self.enc_output(proposal_memory)), proposals

    def select(self, scores: Tensor, num_queries: int, boxes: Tensor | None = None) -> Tensor:
        """``(B, S)`` token scores -> ``(B, Q)`` indices of the ``Q`` highest, highest first.

        With ``query_nms``, ``boxes`` (``(B, S, 4)`` inverse-sigmoid ``cxcywh``) are needed: among the
        ``QUERY_NMS_CANDIDATES x Q`` highest, those that a higher-scoring proposal overlaps with IoU
        above ``query_nms`` come last (:func:`~litedetr.ops.distinct_topk`).
        """
        if self.query_nms is None:
            return torch.topk(scores, num_queries, dim=1).indices
        if boxes is None:
            raise ValueError("query_nms selects by the proposals' boxes; none were given")
        xyxy = box_cxcywh_to_xyxy(boxes.detach().sigmoid())
        return distinct_topk(scores.detach(), xyxy, num_queries, self.query_nms, QUERY_NMS_CANDIDATES * num_queries)

    def learned_content(self, batch: int, num_queries: int) -> Tensor:
        """The first ``num_queries`` rows of the content embedding, ``(B, Q, C)``."""
        if self.content is None or num_queries > self.content.num_embeddings:
            have = 0 if self.content is None else self.content.num_embeddings
            raise ValueError(f"{num_queries} queries asked of a content embedding with {have} rows")
        return self.content.weight[:num_queries].expand(batch, -1, -1)


class MixedQuerySelection(QuerySelection):
    """DINO: top-k by the highest class logit; learned content (or, without an embedding, the
    selected proposal features, detached)."""

    def forward(self, memory: Tensor, tokens: MultiScaleTokens, num_queries: int) -> tuple[DecoderQueries, dict[str, Tensor]]:
        """
        Args:
            memory: ``(B, S, C)`` encoder output.
            tokens: the encoder input (padding mask and level shapes).
            num_queries: ``Q``, how many to select.

        Returns:
            The decoder queries and ``enc_outputs``: ``pred_logits (B, Q, K)`` and ``pred_boxes (B, Q, 4)``
            of the selected proposals (and, with ``dense`` in training, ``dense``: the same
            ``(B, S, K)`` and ``(B, S, 4)`` of every token).
        """
        proposal_memory, proposals = self.proposals(memory, tokens, num_queries)
        logits = self.class_head(proposal_memory)
        every_box = self.box_head(proposal_memory) + proposals if self.query_nms is not None or (self.dense and self.training) else None
        topk = self.select(logits.max(-1).values, num_queries, every_box)
        selected = _gather(proposal_memory, topk)
        anchors = self.box_head(selected) + _gather(proposals, topk)
        content = self.learned_content(memory.shape[0], num_queries) if self.content is not None else selected.detach()
        queries = DecoderQueries(content, anchors.detach(), None, groups={"one_to_one": slice(0, num_queries)})
        enc_outputs: dict[str, Any] = {"pred_logits": self.class_head(selected), "pred_boxes": anchors.sigmoid()}
        if self.dense and self.training:
            enc_outputs["dense"] = {"pred_logits": logits, "pred_boxes": every_box.sigmoid()}
        return queries, enc_outputs


class BoxEmbeddingQuerySelection(QuerySelection):
    """Two-stage Deformable DETR and H-DETR: top-k by the class-0 logit; the query position (and content)
    embedded from the selected boxes (their sine embedding through ``pos_trans``; "pure" query selection).

    Args:
        d_model, num_classes, dense, query_nms: as :class:`QuerySelection`.
        num_content: None: the content is the second half of ``pos_trans`` (Deformable DETR); else the
            rows of a learned content embedding (H-DETR's mixed selection).
    """

    def __init__(self, d_model: int, num_classes: int, num_content: int | None, dense: bool = False, query_nms: float | None = None):
        super().__init__(d_model, num_classes, num_content, dense, query_nms)
        self.pos_trans = nn.Linear(2 * d_model, 2 * d_model)
        self.pos_trans_norm = nn.LayerNorm(2 * d_model)
        nn.init.xavier_uniform_(self.pos_trans.weight)

    def forward(self, memory: Tensor, tokens: MultiScaleTokens, num_queries: int) -> tuple[DecoderQueries, dict[str, Tensor]]:
        """
        Args:
            memory: ``(B, S, C)`` encoder output.
            tokens: the encoder input (padding mask and level shapes).
            num_queries: ``Q``, how many to select.

        Returns:
            The decoder queries and ``enc_outputs``: ``pred_logits (B, S, K)`` and ``pred_boxes (B, S, 4)``
            of every token's proposal (with ``dense`` in training, the same again as ``dense``).
        """
        proposal_memory, proposals = self.proposals(memory, tokens, num_queries)
        logits = self.class_head(proposal_memory)
        boxes = self.box_head(proposal_memory) + proposals
        topk = self.select(logits[..., 0], num_queries, boxes)
        reference = _gather(boxes, topk).detach()
        d_model = memory.shape[-1]
        embedding = box_sine_embedding(reference.sigmoid(), d_model // 2, y_first=False)
        position, content = self.pos_trans_norm(self.pos_trans(embedding)).split(d_model, -1)
        if self.content is not None:
            content = self.learned_content(memory.shape[0], num_queries)
        queries = DecoderQueries(content, reference, position, groups={"one_to_one": slice(0, num_queries)})
        enc_outputs: dict[str, Any] = {"pred_logits": logits, "pred_boxes": boxes.sigmoid()}
        if self.dense and self.training:
            enc_outputs["dense"] = dict(enc_outputs)
        return queries, enc_outputs


def __getattr__(name: str) -> type[QuerySelection]:
    if name == "PosTransQuerySelection":  # its name before 0.3
        warnings.warn("PosTransQuerySelection is now BoxEmbeddingQuerySelection", DeprecationWarning, stacklevel=2)
        return BoxEmbeddingQuerySelection
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
