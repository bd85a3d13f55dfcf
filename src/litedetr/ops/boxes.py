"""Box formats, pairwise IoU / generalised IoU, a top-k of distinct boxes, and the clamped inverse sigmoid."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["box_cxcywh_to_xyxy", "box_xyxy_to_cxcywh", "box_iou", "distinct_topk", "generalized_box_iou", "inverse_sigmoid"]


def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """``(..., 4)`` as ``(cx, cy, w, h)`` -> ``(..., 4)`` as ``(x0, y0, x1, y1)``."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], -1)


def box_xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """``(..., 4)`` as ``(x0, y0, x1, y1)`` -> ``(..., 4)`` as ``(cx, cy, w, h)``."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], -1)


def _area(boxes: Tensor) -> Tensor:
    """``(..., N, 4)`` xyxy -> ``(..., N)``."""
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def box_iou(boxes1: Tensor, boxes2: Tensor, eps: float = 0.0) -> tuple[Tensor, Tensor]:
    """Pairwise IoU of two sets of xyxy boxes, ``inter / (union + eps)``.

    Args:
        boxes1: ``(..., N, 4)`` xyxy (leading batch dimensions optional).
        boxes2: ``(..., M, 4)`` xyxy, the same leading dimensions.
        eps: added to the union in the denominator only; 0 as Deformable DETR and H-DETR, 1e-6 as
            DINO and Lite-DETR (which makes boxes of zero area give IoU 0 instead of NaN).

    Returns:
        ``(iou, union)``, both ``(..., N, M)``; ``union`` is without ``eps``.
    """
    area1, area2 = _area(boxes1), _area(boxes2)
    top_left = torch.max(boxes1[..., :, None, :2], boxes2[..., None, :, :2])
    bottom_right = torch.min(boxes1[..., :, None, 2:], boxes2[..., None, :, 2:])
    wh = (bottom_right - top_left).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area1[..., :, None] + area2[..., None, :] - inter
    return inter / (union + eps), union


def distinct_topk(scores: Tensor, boxes: Tensor, k: int, iou_threshold: float, candidates: int) -> Tensor:
    """The ``k`` highest-scoring boxes, passing over any box that a higher-scoring one overlaps.

    Among the ``candidates`` highest-scoring boxes, a box is suppressed when a higher-scoring candidate
    has IoU above ``iou_threshold`` with it (Fast NMS, Bolya et al. 2019: a suppressed box still
    suppresses, so it drops at least what greedy NMS drops). The kept candidates come first, by score,
    then the suppressed ones by score where fewer than ``k`` are kept, so the output always has ``k``
    indices and fixed shapes (exportable, no data-dependent sizes).

    Args:
        scores: ``(B, S)``.
        boxes: ``(B, S, 4)`` xyxy.
        k: how many to return, ``k <= min(S, candidates)``.
        iou_threshold: suppress above this IoU.
        candidates: how many of the highest-scoring boxes are compared pairwise (``(B, M, M)`` IoUs).

    Returns:
        ``(B, k)`` indices into ``S``.
    """
    order = torch.topk(scores, min(candidates, scores.shape[1]), dim=1).indices
    ranked = torch.gather(boxes, 1, order[..., None].expand(-1, -1, 4))
    iou, _ = box_iou(ranked, ranked)
    suppressed = (iou.triu(1) > iou_threshold).any(1)
    # the kept candidates before the suppressed, each group in score order (the order is by score already)
    rank = torch.arange(order.shape[1], device=order.device) + suppressed * order.shape[1]
    return torch.gather(order, 1, torch.topk(rank, k, dim=1, largest=False).indices)


def _check_not_degenerate(boxes: Tensor, name: str) -> None:
    bad = (boxes[:, 2:] < boxes[:, :2]).any(-1)
    if bad.any():
        first = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"generalized_box_iou: {int(bad.sum())} box(es) in {name} have x1 < x0 or y1 < y0 "
            f"(first at index {first}: {boxes[first].tolist()}); boxes must be xyxy"
        )


def generalized_box_iou(boxes1: Tensor, boxes2: Tensor, eps: float = 0.0) -> Tensor:
    """Pairwise generalised IoU (Rezatofighi et al., 2019) of two sets of xyxy boxes,
    ``iou - (enclosing - union) / (enclosing + eps)`` with ``iou`` from :func:`box_iou` with the same ``eps``.

    Args:
        boxes1: ``(N, 4)`` xyxy with ``x1 >= x0`` and ``y1 >= y0``.
        boxes2: ``(M, 4)`` xyxy, likewise.
        eps: 0 as Deformable DETR and H-DETR, 1e-6 as DINO and Lite-DETR; it changes the value
            noticeably only for boxes whose areas are not large against ``eps``.

    Returns:
        ``(N, M)`` values in ``[-1, 1]``.

    Raises:
        ValueError: a box has ``x1 < x0`` or ``y1 < y0`` (degenerate boxes give inf / NaN).
    """
    _check_not_degenerate(boxes1, "boxes1")
    _check_not_degenerate(boxes2, "boxes2")
    iou, union = box_iou(boxes1, boxes2, eps)
    top_left = torch.min(boxes1[:, None, :2], boxes2[None, :, :2])
    bottom_right = torch.max(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = (bottom_right - top_left).clamp(min=0)
    enclosing = wh[..., 0] * wh[..., 1]
    return iou - (enclosing - union) / (enclosing + eps)


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    """Logit of ``x`` clamped to ``[0, 1]``, with both numerator and denominator kept ``>= eps``."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))
