"""One-to-one Hungarian matching of predictions to targets (Deformable DETR / DINO costs)."""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from litedetr.ops import box_cxcywh_to_xyxy, generalized_box_iou

__all__ = ["HungarianMatcher", "focal_class_cost"]

_WORST = 1e12
"""The matching cost given to NaN and infinite entries (finite costs are at most a few hundred)."""


def focal_class_cost(logits: Tensor, labels: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Focal-loss classification cost: focal loss of calling a prediction positive minus negative.

    Args:
        logits: ``(P, K)`` class logits of ``P`` predictions.
        labels: ``(T,)`` target classes in ``[0, K)``.

    Returns:
        ``(P, T)`` cost, lower when the prediction scores the target's class higher.
    """
    prob = logits.sigmoid()[:, labels]
    eps = 1e-8
    positive = alpha * (1 - prob) ** gamma * -(prob + eps).log()
    negative = (1 - alpha) * prob**gamma * -(1 - prob + eps).log()
    return positive - negative


class HungarianMatcher(nn.Module):
    """Minimum-cost bipartite matching per image, with cost
    ``cost_class * focal + cost_bbox * L1(cxcywh) - cost_giou * GIoU``.

    Costs for the whole batch are computed at once; only the assignment runs per image (scipy).
    Deformable DETR, H-DETR and DINO all use costs 2 / 5 / 2 with the focal cost's ``1e-8`` inside
    the logarithms; they differ only in the GIoU: ``giou_eps = 0`` for Deformable DETR and H-DETR,
    ``1e-6`` for DINO and Lite-DETR (see :func:`litedetr.ops.generalized_box_iou`).
    """

    def __init__(
        self,
        cost_class: float = 2.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        giou_eps: float = 0.0,
    ) -> None:
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("HungarianMatcher: all costs are 0")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.giou_eps = giou_eps

    def cost_matrix(self, pred_logits: Tensor, pred_boxes: Tensor, labels: Tensor, boxes: Tensor) -> Tensor:
        """``(P, K)`` logits and ``(P, 4)`` cxcywh boxes against ``(T,)`` labels and ``(T, 4)`` boxes -> ``(P, T)``."""
        cost_class = focal_class_cost(pred_logits, labels, self.focal_alpha, self.focal_gamma)
        cost_bbox = torch.cdist(pred_boxes, boxes, p=1)
        cost_giou = -generalized_box_iou(box_cxcywh_to_xyxy(pred_boxes), box_cxcywh_to_xyxy(boxes), self.giou_eps)
        return self.cost_class * cost_class + self.cost_bbox * cost_bbox + self.cost_giou * cost_giou

    @torch.no_grad()
    def forward(self, outputs: dict[str, Tensor], targets: list[dict[str, Tensor]]) -> list[tuple[Tensor, Tensor]]:
        """Match each image's queries to its targets.

        Args:
            outputs: ``pred_logits (B, Q, K)`` and ``pred_boxes (B, Q, 4)`` (normalised cxcywh).
            targets: one dict per image with ``labels (N_b,)`` and ``boxes (N_b, 4)`` (normalised cxcywh).

        Returns:
            per image ``(pred_idx, tgt_idx)``, two ``(min(Q, N_b),)`` long tensors on CPU;
            ``pred_idx`` is sorted.
        """
        bs, num_queries = outputs["pred_logits"].shape[:2]
        sizes = [len(t["boxes"]) for t in targets]
        if sum(sizes) == 0:
            empty = torch.empty(0, dtype=torch.int64)
            return [(empty, empty.clone()) for _ in range(bs)]
        cost = self.cost_matrix(
            outputs["pred_logits"].flatten(0, 1).float(),
            outputs["pred_boxes"].flatten(0, 1).float(),
            torch.cat([t["labels"] for t in targets]),
            torch.cat([t["boxes"] for t in targets]).float(),
        )
        # Predictions holding NaN or inf count as the worst match: the step completes on every rank, its loss is
        # not finite, and the trainer stops all ranks together after its all-reduce (raising here would not).
        cost = torch.nan_to_num(cost.view(bs, num_queries, -1).cpu(), nan=_WORST, posinf=_WORST, neginf=-_WORST)
        indices = []
        for b, block in enumerate(cost.split(sizes, -1)):
            pred_idx, tgt_idx = linear_sum_assignment(block[b].numpy())
            indices.append((torch.as_tensor(pred_idx, dtype=torch.int64), torch.as_tensor(tgt_idx, dtype=torch.int64)))
        return indices
