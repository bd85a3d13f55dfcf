"""Turn network outputs into scored, labelled boxes in image pixels (DINO's top-k post-processing)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from litedetr.ops import box_cxcywh_to_xyxy

__all__ = ["postprocess", "kept_detections"]


@torch.no_grad()
def postprocess(pred_logits: Tensor, pred_boxes: Tensor, image_sizes: Tensor, num_select: int = 300) -> list[dict[str, Tensor]]:
    """Top ``num_select`` (query, class) pairs per image by sigmoid score.

    A query may appear several times, once per class it scores highly.

    Args:
        pred_logits: ``(B, Q, K)``.
        pred_boxes: ``(B, Q, 4)`` normalised cxcywh.
        image_sizes: ``(B, 2)`` as ``(H, W)`` in pixels.
        num_select: pairs kept per image, at most ``Q * K``.

    Returns:
        per image a dict: ``scores (N,)`` in descending order, ``labels (N,)`` long,
        ``boxes (N, 4)`` absolute xyxy (not clipped to the image); ``N = num_select``; scores and
        boxes in float32 whatever the inputs' floating dtype (a bf16 autocast forward).
    """
    bs, num_queries, num_classes = pred_logits.shape
    if num_select > num_queries * num_classes:
        raise ValueError(f"num_select={num_select} exceeds the {num_queries * num_classes} query-class pairs")
    pred_logits, pred_boxes = pred_logits.float(), pred_boxes.float()  # scores and boxes in float32 after an autocast forward
    prob = pred_logits.sigmoid().flatten(1)
    scores, flat_idx = prob.topk(num_select, dim=1)
    labels = flat_idx % num_classes
    query_idx = flat_idx // num_classes
    boxes = box_cxcywh_to_xyxy(pred_boxes).gather(1, query_idx[..., None].expand(-1, -1, 4))
    height, width = image_sizes.to(boxes).unbind(1)
    boxes = boxes * torch.stack([width, height, width, height], 1)[:, None]
    return [{"scores": s, "labels": c, "boxes": b} for s, c, b in zip(scores, labels, boxes)]


def kept_detections(boxes: Tensor, scores: Tensor, labels: Tensor, size: tuple[int, int], threshold: float, class_name: Callable[[int], str]) -> dict[str, Any]:
    """One image's detections scoring at least ``threshold``, as :meth:`Detector.predict` returns them.

    Args:
        boxes: ``(N, 4)`` xyxy pixels; ``scores (N,)`` descending; ``labels (N,)``.
        size: the image's ``(H, W)``; boxes are clipped to it.
        class_name: label -> display name.

    Returns:
        ``boxes``, ``scores``, ``labels`` on the CPU and ``names``.
    """
    keep = scores >= threshold
    height, width = size
    kept = boxes[keep].cpu()
    kept[:, 0::2] = kept[:, 0::2].clamp(0, width)
    kept[:, 1::2] = kept[:, 1::2].clamp(0, height)
    kept_labels = labels[keep].cpu()
    return {"boxes": kept, "scores": scores[keep].cpu(), "labels": kept_labels, "names": [class_name(int(c)) for c in kept_labels]}
