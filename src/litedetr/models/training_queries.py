"""Training-only decoder queries: parts that add queries to the decoder in training and say how to read them.

- :class:`TrainingQueries`: what each of them is (the interface).
- :class:`NoTrainingQueries`: none (Deformable DETR).
- :class:`Denoising`: DINO's contrastive denoising groups in front of the matching queries.
- :class:`OneToManyGroup`: H-DETR's hybrid branch, an extra group of selected queries behind the
  one-to-one ones, matched to the targets repeated ``k`` times and masked from them in self-attention.

The detector calls them in training only.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor, nn

from litedetr.models.denoising import build_denoising_queries
from litedetr.models.query_selection import DecoderQueries

__all__ = ["TrainingQueries", "NoTrainingQueries", "Denoising", "OneToManyGroup"]


class TrainingQueries(nn.Module):
    """What adds training-only queries: :meth:`forward` returns the decoder's queries with its own added,
    their self-attention mask and their ``groups`` (which slice of the decoder's output is whose)."""

    extra_selected = 0
    """How many queries beyond the one-to-one ones the query selection must pick in training."""

    def forward(self, queries: DecoderQueries, targets: list[dict[str, Tensor]]) -> DecoderQueries:
        raise NotImplementedError


class NoTrainingQueries(TrainingQueries):
    """No training-only queries (Deformable DETR): the queries pass unchanged."""

    def forward(self, queries: DecoderQueries, targets: list[dict[str, Tensor]]) -> DecoderQueries:
        return queries


class Denoising(TrainingQueries):
    """DINO's contrastive denoising (see :mod:`litedetr.models.denoising`): ``label_embed`` maps a
    (noised) class to the query content; ``K + 1`` rows as DINO's ``label_enc``.

    Args:
        d_model: query channels.
        num_classes: ``K``.
        number: denoising pairs per target slot across all groups (DINO's 100).
        label_noise_ratio, box_noise_scale: noise of labels and boxes.
    """

    def __init__(self, d_model: int, num_classes: int, number: int, label_noise_ratio: float, box_noise_scale: float):
        super().__init__()
        self.label_embed = nn.Embedding(num_classes + 1, d_model)
        self.num_classes, self.number = num_classes, number
        self.label_noise_ratio, self.box_noise_scale = label_noise_ratio, box_noise_scale

    def forward(self, queries: DecoderQueries, targets: list[dict[str, Tensor]]) -> DecoderQueries:
        """Denoising queries in front of ``queries`` (unchanged when no image has a target)."""
        num = queries.content.shape[1]
        dn = build_denoising_queries(targets, self.label_embed, self.num_classes, num, self.number, self.label_noise_ratio, self.box_noise_scale)
        if dn is None:  # no image has a target: the label embedding still takes part (with a zero gradient), as DDP requires
            return replace(queries, content=queries.content + 0.0 * self.label_embed.weight.sum())
        attn_mask = dn.attn_mask.clone()
        if queries.attn_mask is not None:
            attn_mask[dn.pad :, dn.pad :] |= queries.attn_mask
        shifted = {name: slice(part.start + dn.pad, part.stop + dn.pad) for name, part in queries.groups.items()}
        return replace(
            queries,
            content=torch.cat([dn.content, queries.content], 1),
            reference=torch.cat([dn.boxes, queries.reference], 1),
            attn_mask=attn_mask,
            groups={"dn": slice(0, dn.pad), **shifted},
            dn_meta=dn.meta(),
        )


class OneToManyGroup(TrainingQueries):
    """H-DETR's one-to-many group: ``num_queries`` more selected queries, seen by no one-to-one query
    and seeing none (a block-diagonal self-attention mask).

    The criterion matches the group to the targets repeated ``k`` times and weighs its losses by
    ``lambda`` (:class:`~litedetr.models.criterion.SetCriterion`).

    Args:
        num_queries: queries of the group (H-DETR: 1500 beside 300 one-to-one).
    """

    def __init__(self, num_queries: int):
        super().__init__()
        self.extra_selected = num_queries

    def forward(self, queries: DecoderQueries, targets: list[dict[str, Tensor]]) -> DecoderQueries:
        """Split the last ``num_queries`` of ``queries`` off as the one-to-many group."""
        total = queries.content.shape[1]
        one_to_one = total - self.extra_selected
        group = (torch.arange(total, device=queries.content.device) >= one_to_one).long()
        return replace(
            queries,
            attn_mask=group[:, None] != group[None, :],
            groups={"one_to_one": slice(0, one_to_one), "one_to_many": slice(one_to_one, total)},
        )
