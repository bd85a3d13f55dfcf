"""DINO's contrastive denoising (CDN): noised copies of the ground truth fed to the decoder in training.

Every target is copied into ``G`` groups, each as a positive (corners moved by less than half the box
size, to be reconstructed) and a negative (moved by between one and two half sizes, to be rejected as
"no object"). The decoder sees these queries in front of its ``Q`` matching queries; an attention
mask keeps the matching queries from reading the ground truth and the groups from reading each other.

Layout of the ``pad = G * group_size`` denoising queries, ``group_size = 2 * N_max``: group ``g``
holds the positives at ``[g * group_size, g * group_size + N_max)`` and the negatives at
``[g * group_size + N_max, (g + 1) * group_size)``; image ``b``'s target ``j`` sits at offset ``j``
of both halves and offsets ``j >= N_b`` are zero padding. This is the layout that
:func:`litedetr.models.criterion.dn_match_indices` pairs with the targets.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from litedetr.ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh, inverse_sigmoid

__all__ = ["DenoisingQueries", "build_denoising_queries"]

BOX_LOGIT_EPS = 1e-3
"""Clamp of :func:`inverse_sigmoid` for the noised boxes, as DINO."""


@dataclass(frozen=True)
class DenoisingQueries:
    """Denoising queries of one batch and the decoder self-attention mask that goes with them.

    Attributes:
        content: ``(B, pad, C)`` label embeddings of the noised labels, zero at padding slots.
        boxes: ``(B, pad, 4)`` noised cxcywh boxes before the sigmoid, zero at padding slots.
        attn_mask: ``(pad + Q, pad + Q)`` bool, ``True`` where attention is blocked (the
            :class:`torch.nn.MultiheadAttention` convention); denoising queries come first.
        num_groups: ``G``.
        group_size: ``2 * N_max``, positives then negatives.
    """

    content: Tensor
    boxes: Tensor
    attn_mask: Tensor
    num_groups: int
    group_size: int

    @property
    def pad(self) -> int:
        """Number of denoising queries, ``num_groups * group_size``."""
        return self.num_groups * self.group_size

    @property
    def num_matching_queries(self) -> int:
        """``Q``, the decoder's own queries behind the denoising ones."""
        return self.attn_mask.shape[0] - self.pad

    def meta(self) -> dict[str, int]:
        """``dn_meta`` as :class:`litedetr.models.criterion.SetCriterion` reads it."""
        return {"num_groups": self.num_groups, "group_size": self.group_size}


def build_denoising_queries(
    targets: list[dict[str, Tensor]],
    label_embed: nn.Embedding,
    num_classes: int,
    num_matching_queries: int,
    num_dn: int = 100,
    label_noise_ratio: float = 0.5,
    box_noise_scale: float = 1.0,
) -> DenoisingQueries | None:
    """Noised positive and negative copies of the targets, in ``G = max(1, num_dn // N_max)`` groups.

    Each query's label is replaced, with probability ``label_noise_ratio / 2``, by a class drawn
    uniformly from ``[0, num_classes)``. Each box corner moves by ``sign * m * half_size *
    box_noise_scale`` (half the width for x, half the height for y) with a random sign per
    coordinate and ``m`` uniform in ``[0, 1)`` for positives, ``[1, 2)`` for negatives; corners are
    then clamped to ``[0, 1]``. Draws use the global torch RNG on the targets' device.

    Args:
        targets: one dict per image with ``labels (N_b,)`` long in ``[0, num_classes)`` and
            ``boxes (N_b, 4)`` normalised cxcywh (:meth:`~litedetr.models.Detector.forward` checks them).
        label_embed: maps a class to the query content, ``(num_classes', C)`` with
            ``num_classes' >= num_classes``.
        num_classes: ``K``; noised labels are drawn from ``[0, K)``.
        num_matching_queries: ``Q``, the decoder's own queries, for the attention mask.
        num_dn: denoising pairs per target slot across all groups (DINO's 100).
        label_noise_ratio: twice the probability of replacing a label.
        box_noise_scale: scale of the corner shifts, in half box sizes.

    Returns:
        The queries and mask (see :class:`DenoisingQueries`), or ``None`` when no image has a target.

    Raises:
        ValueError: a noise parameter is out of range.
    """
    if not 0.0 <= label_noise_ratio <= 1.0:
        raise ValueError(f"label_noise_ratio must lie in [0, 1], got {label_noise_ratio}")
    if box_noise_scale < 0:
        raise ValueError(f"box_noise_scale must be >= 0, got {box_noise_scale}")
    sizes = [len(t["labels"]) for t in targets]
    n_max = max(sizes, default=0)
    if n_max == 0:
        return None

    device = targets[0]["labels"].device
    num_groups = max(1, num_dn // n_max)
    labels, boxes, valid = _pad_targets(targets, n_max)

    # Every (image, group, positive / negative, slot) gets its own copy: (B, G, 2, N_max[, 4]).
    copies = (len(targets), num_groups, 2, n_max)
    labels = labels[:, None, None].expand(copies)
    boxes = boxes[:, None, None].expand(*copies, 4)
    valid = valid[:, None, None].expand(copies)

    replace = torch.rand(copies, device=device) < label_noise_ratio * 0.5
    random_labels = torch.randint(0, num_classes, copies, device=device)
    content = label_embed(torch.where(replace, random_labels, labels))

    half_wh = boxes[..., 2:] / 2
    half_size = torch.cat([half_wh, half_wh], -1)  # (w/2, h/2) for (x0, y0) and for (x1, y1)
    sign = torch.randint(0, 2, (*copies, 4), device=device).to(boxes.dtype) * 2 - 1
    magnitude = torch.rand((*copies, 4), device=device, dtype=boxes.dtype)
    magnitude[:, :, 1] += 1.0  # negatives: [1, 2)
    corners = box_cxcywh_to_xyxy(boxes) + sign * magnitude * half_size * box_noise_scale
    box_logits = inverse_sigmoid(box_xyxy_to_cxcywh(corners.clamp(0.0, 1.0)), eps=BOX_LOGIT_EPS)

    padding = ~valid[..., None]
    pad = num_groups * 2 * n_max
    return DenoisingQueries(
        content=content.masked_fill(padding, 0.0).flatten(1, 3),
        boxes=box_logits.masked_fill(padding, 0.0).flatten(1, 3),
        attn_mask=_attention_mask(pad, 2 * n_max, num_matching_queries, device),
        num_groups=num_groups,
        group_size=2 * n_max,
    )


def _pad_targets(targets: list[dict[str, Tensor]], n_max: int) -> tuple[Tensor, Tensor, Tensor]:
    """Stack the targets, padded to ``n_max`` per image.

    Returns:
        ``labels (B, N_max)`` long, ``boxes (B, N_max, 4)`` cxcywh and ``valid (B, N_max)`` bool,
        zero / ``False`` at padding slots.
    """
    device, dtype = targets[0]["labels"].device, targets[0]["boxes"].dtype
    labels = torch.zeros(len(targets), n_max, dtype=torch.long, device=device)
    boxes = torch.zeros(len(targets), n_max, 4, dtype=dtype, device=device)
    for b, target in enumerate(targets):
        num = len(target["labels"])
        labels[b, :num] = target["labels"]
        boxes[b, :num] = target["boxes"]
    sizes = torch.tensor([len(t["labels"]) for t in targets], device=device)
    valid = torch.arange(n_max, device=device)[None] < sizes[:, None]
    return labels, boxes, valid


def _attention_mask(pad: int, group_size: int, num_matching_queries: int, device: torch.device) -> Tensor:
    """``(pad + Q, pad + Q)`` bool, ``True`` = blocked.

    Matching queries see no denoising query; a denoising query sees its own group and every
    matching query.
    """
    total = pad + num_matching_queries
    mask = torch.zeros(total, total, dtype=torch.bool, device=device)
    mask[pad:, :pad] = True
    group = torch.arange(pad, device=device) // group_size
    mask[:pad, :pad] = group[:, None] != group[None, :]
    return mask
