"""Turn network outputs into scored, labelled boxes in image pixels (DINO's top-k post-processing)."""

from __future__ import annotations

import torch
from torch import Tensor

from litedetr.ops import box_cxcywh_to_xyxy

__all__ = ["postprocess"]


@torch.no_grad()
def postprocess(
    pred_logits: Tensor, pred_boxes: Tensor, image_sizes: Tensor, num_select: int = 300
) -> list[dict[str, Tensor]]:
    """Top ``num_select`` (query, class) pairs per image by sigmoid score.

    A query may appear several times, once per class it scores highly.

    Args:
        pred_logits: ``(B, Q, K)``.
        pred_boxes: ``(B, Q, 4)`` normalised cxcywh.
        image_sizes: ``(B, 2)`` as ``(H, W)`` in pixels.
        num_select: pairs kept per image, at most ``Q * K``.

    Returns:
        per image a dict: ``scores (N,)`` in descending order, ``labels (N,)`` long,
        ``boxes (N, 4)`` absolute xyxy (not clipped to the image); ``N = num_select``.
    """
    bs, num_queries, num_classes = pred_logits.shape
    if num_select > num_queries * num_classes:
        raise ValueError(f"num_select={num_select} exceeds the {num_queries * num_classes} query-class pairs")
    prob = pred_logits.sigmoid().flatten(1)
    scores, flat_idx = prob.topk(num_select, dim=1)
    labels = flat_idx % num_classes
    query_idx = flat_idx // num_classes
    boxes = box_cxcywh_to_xyxy(pred_boxes).gather(1, query_idx[..., None].expand(-1, -1, 4))
    height, width = image_sizes.to(boxes).unbind(1)
    boxes = boxes * torch.stack([width, height, width, height], 1)[:, None]
    return [{"scores": s, "labels": c, "boxes": b} for s, c, b in zip(scores, labels, boxes)]
