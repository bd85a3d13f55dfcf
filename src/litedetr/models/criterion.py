"""Set-prediction losses of Deformable DETR / DINO / H-DETR.

Every set of predictions (final layer, each auxiliary decoder layer, the encoder proposals, the
denoising queries and the one-to-many branch) gets the same three losses: sigmoid focal
classification, L1 on normalised ``cxcywh`` boxes and generalised IoU. Only the way predictions are
paired with targets differs: Hungarian matching, the fixed denoising layout, or Hungarian matching
against repeated targets (one-to-many).

Loss keys: ``loss_class``, ``loss_bbox``, ``loss_giou``, each optionally suffixed ``_0``, ``_1``, ...
(auxiliary layer), ``_enc`` (encoder proposals), ``_dn`` / ``_dn_0``, ... (denoising) and finally
``_o2m`` (one-to-many branch), e.g. ``loss_giou_2_o2m``.

The three original code bases compute these losses identically (focal loss ``mean over queries,
summed, / num_boxes * Q``; L1 and ``1 - GIoU`` summed ``/ num_boxes``; ``num_boxes`` the targets per
image batch, for the one-to-many branch the repeated ones, averaged over ranks, at least 1; one
matcher, costs 2 / 5 / 2, for every set) except for what the constructor arguments select:

============================  ==========================  =============================  =======================
argument                      Deformable DETR             H-DETR (hybrid branch)         DINO / Lite-DETR
============================  ==========================  =============================  =======================
``weight_dict``               :data:`DEFORMABLE_WEIGHTS`  :data:`DEFORMABLE_WEIGHTS`     :data:`DEFAULT_WEIGHTS`
``giou_eps`` (and matcher's)  0                           0                              1e-6
``binary_encoder_targets``    True                        True                           False
``one_to_many_repeat``        (no one-to-many branch)     ``k_one2many`` (6 in configs)  (no one-to-many branch)
``one_to_many_weight``                                    ``lambda_one2many`` (1.0)
============================  ==========================  =============================  =======================
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from litedetr.models.matcher import HungarianMatcher
from litedetr.ops import box_cxcywh_to_xyxy, generalized_box_iou

__all__ = ["SetCriterion", "sigmoid_focal_loss", "dn_match_indices", "DEFAULT_WEIGHTS", "DEFORMABLE_WEIGHTS"]

DEFAULT_WEIGHTS: dict[str, float] = {"loss_class": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0}
"""DINO's (and Lite-DETR's) loss weights; they apply to every suffixed variant of a key too."""

DEFORMABLE_WEIGHTS: dict[str, float] = {"loss_class": 2.0, "loss_bbox": 5.0, "loss_giou": 2.0}
"""Deformable DETR's and H-DETR's loss weights (class weight 2); they apply to every suffixed variant too."""

Indices = list[tuple[Tensor, Tensor]]


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Element-wise focal loss (Lin et al., 2017) on sigmoid probabilities.

    Args:
        logits: ``(..., K)`` raw scores.
        targets: same shape, 1 for the true class and 0 elsewhere.

    Returns:
        Loss of the same shape, unreduced.
    """
    prob = logits.sigmoid()
    cross_entropy = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_true = prob * targets + (1 - prob) * (1 - targets)
    alpha_true = alpha * targets + (1 - alpha) * (1 - targets)
    return alpha_true * (1 - p_true) ** gamma * cross_entropy


def dn_match_indices(sizes: list[int], num_groups: int, group_size: int) -> Indices:
    """Fixed pairing of DINO's contrastive-denoising queries to targets.

    In every group of ``group_size = 2 * N_max`` queries, query ``j`` is the positive for target
    ``j`` and query ``N_max + j`` its negative; queries for ``j >= N_b`` are padding. Only positives
    are paired.

    Args:
        sizes: number of targets ``N_b`` per image.

    Returns:
        per image ``(query_idx, tgt_idx)``, each ``(num_groups * N_b,)`` long.
    """
    n_max = group_size // 2
    if any(n > n_max for n in sizes):
        raise ValueError(f"denoising groups of size {group_size} hold at most {n_max} targets, got {max(sizes)}")
    offsets = torch.arange(num_groups)[:, None] * group_size
    indices = []
    for n in sizes:
        tgt_idx = torch.arange(n)
        indices.append(((offsets + tgt_idx[None]).flatten(), tgt_idx.repeat(num_groups)))
    return indices


class SetCriterion(nn.Module):
    """Focal, L1 and GIoU losses for DETR-family detectors with auxiliary, encoder, denoising and
    one-to-many outputs.

    Args:
        num_classes: ``K``; target labels lie in ``[0, K)`` and logits have ``K`` columns.
        matcher: one-to-one matcher for every non-denoising set of predictions.
        weight_dict: weight per base loss key (``loss_class``, ...), applied to all its suffixed
            variants; an exact suffixed key overrides its base. ``None``: :data:`DEFAULT_WEIGHTS`.
        focal_alpha, focal_gamma: focal-loss parameters.
        one_to_many_repeat: how often each image's targets are repeated for the one-to-many branch
            (H-DETR's ``k_one2many``).
        giou_eps: ``eps`` of :func:`litedetr.ops.generalized_box_iou` in the GIoU loss: 0 as
            Deformable DETR and H-DETR, 1e-6 as DINO; must equal ``matcher.giou_eps``, since each code
            base uses one GIoU for matching and loss.
        binary_encoder_targets: match and supervise ``enc_outputs`` against targets whose labels are
            all replaced by 0 (class-agnostic proposals, as Deformable DETR and H-DETR); ``False``
            uses the real labels, as DINO.
        one_to_many_weight: factor on every returned ``_o2m`` loss (H-DETR's ``lambda_one2many``),
            applied before, and independently of, ``weight_dict``.
        encoder_one_to_many: how often each image's targets are repeated and matched over every
            token's proposal in ``enc_dense`` (``_enc_dense`` losses; labels as for ``enc_outputs``).

    ``outputs`` for :meth:`forward`: ``pred_logits (B, Q, K)`` and ``pred_boxes (B, Q, 4)``
    (normalised cxcywh), optionally ``aux_outputs`` (list of such dicts), ``enc_outputs`` (one
    dict), ``dn_outputs`` (dict with ``pred_logits (B, G * group_size, K)``, ``pred_boxes`` and
    optionally ``aux_outputs``) together with ``dn_meta = {"num_groups": G, "group_size": 2 * N_max}``,
    ``one_to_many`` (dict structured like the top level, without denoising) and ``enc_dense``
    (``pred_logits (B, S, K)`` and ``pred_boxes (B, S, 4)`` of every encoder token).
    """

    def __init__(
        self,
        num_classes: int,
        matcher: HungarianMatcher,
        weight_dict: Mapping[str, float] | None = None,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        one_to_many_repeat: int = 6,
        giou_eps: float = 0.0,
        binary_encoder_targets: bool = False,
        one_to_many_weight: float = 1.0,
        encoder_one_to_many: int = 6,
    ) -> None:
        super().__init__()
        if matcher.giou_eps != giou_eps:
            raise ValueError(f"the matcher's giou_eps {matcher.giou_eps} differs from the criterion's {giou_eps}")
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = dict(DEFAULT_WEIGHTS if weight_dict is None else weight_dict)
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.one_to_many_repeat = one_to_many_repeat
        self.giou_eps = giou_eps
        self.binary_encoder_targets = binary_encoder_targets
        self.one_to_many_weight = one_to_many_weight
        self.encoder_one_to_many = encoder_one_to_many

    def forward(self, outputs: Mapping[str, Any], targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """Unweighted losses, one scalar per key.

        Args:
            outputs: see the class docstring.
            targets: one dict per image with ``labels (N_b,)`` long in ``[0, K)`` and
                ``boxes (N_b, 4)`` normalised cxcywh (:meth:`~litedetr.models.Detector.forward` checks them,
                once per batch).

        Returns:
            the losses by key; a NaN or infinite prediction gives a NaN or infinite loss, which the trainer
            checks once per step after its all-reduce, so that every process stops together.
        """
        device = outputs["pred_logits"].device
        num_boxes = _num_boxes(targets, device)
        losses = self._set_losses(outputs, targets, num_boxes, suffix="")
        if "dn_outputs" in outputs:
            losses.update(self._dn_losses(outputs["dn_outputs"], outputs["dn_meta"], targets, num_boxes))
        if "one_to_many" in outputs:
            repeated = [_repeat_targets(t, self.one_to_many_repeat) for t in targets]
            one_to_many = self._set_losses(outputs["one_to_many"], repeated, _num_boxes(repeated, device), suffix="_o2m")
            losses.update({key: self.one_to_many_weight * value for key, value in one_to_many.items()})
        if "enc_dense" in outputs:
            losses.update(self._dense_encoder_losses(outputs["enc_dense"], targets, device))
        return losses

    def weighted(self, losses: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Each loss times its weight (:meth:`weight`); keys without a weight are left out. Their sum is the training objective."""
        weights = {key: self.weight(key) for key in losses}
        return {key: weights[key] * value for key, value in losses.items() if weights[key] is not None}

    def weight(self, key: str) -> float | None:
        """Weight of a (possibly suffixed) loss key: exact entry first, else its base key's."""
        if key in self.weight_dict:
            return self.weight_dict[key]
        bases = [base for base in self.weight_dict if key.startswith(base + "_")]
        return self.weight_dict[max(bases, key=len)] if bases else None

    def _set_losses(self, outputs: Mapping[str, Any], targets: list[dict[str, Tensor]], num_boxes: float, suffix: str) -> dict[str, Tensor]:
        """Hungarian-matched losses of the final layer, every auxiliary layer and the encoder (against
        class-agnostic targets when ``binary_encoder_targets``)."""
        named = [("", outputs, targets)]
        named += [(f"_{i}", aux, targets) for i, aux in enumerate(outputs.get("aux_outputs", []))]
        if "enc_outputs" in outputs:
            enc_targets = [_binary_targets(t) for t in targets] if self.binary_encoder_targets else targets
            named.append(("_enc", outputs["enc_outputs"], enc_targets))
        losses = {}
        for name, out, paired_targets in named:
            indices = self.matcher(out, paired_targets)
            losses.update(_suffixed(self.paired_losses(out, paired_targets, indices, num_boxes), name + suffix))
        return losses

    def _dense_encoder_losses(self, dense: Mapping[str, Tensor], targets: list[dict[str, Tensor]], device: torch.device) -> dict[str, Tensor]:
        """Every token's proposal against the targets repeated ``encoder_one_to_many`` times."""
        if self.binary_encoder_targets:
            targets = [_binary_targets(t) for t in targets]
        repeated = [_repeat_targets(t, self.encoder_one_to_many) for t in targets]
        indices = self.matcher(dense, repeated)
        return _suffixed(self.paired_losses(dense, repeated, indices, _num_boxes(repeated, device)), "_enc_dense")

    def _dn_losses(self, dn_outputs: Mapping[str, Any], dn_meta: Mapping[str, int], targets: list[dict[str, Tensor]], num_boxes: float) -> dict[str, Tensor]:
        """Denoising losses with the fixed pairing, normalised by ``num_boxes * num_groups``."""
        num_groups, group_size = dn_meta["num_groups"], dn_meta["group_size"]
        num_dn = dn_outputs["pred_logits"].shape[1]
        if num_dn != num_groups * group_size:
            raise ValueError(f"dn_outputs hold {num_dn} queries but dn_meta says {num_groups} x {group_size}")
        indices = dn_match_indices([len(t["labels"]) for t in targets], num_groups, group_size)
        named = [("_dn", dn_outputs)]
        named += [(f"_dn_{i}", aux) for i, aux in enumerate(dn_outputs.get("aux_outputs", []))]
        losses = {}
        for name, out in named:
            losses.update(_suffixed(self.paired_losses(out, targets, indices, num_boxes * num_groups), name))
        return losses

    def paired_losses(self, outputs: Mapping[str, Tensor], targets: list[dict[str, Tensor]], indices: Indices, num_boxes: float) -> dict[str, Tensor]:
        """``loss_class``, ``loss_bbox``, ``loss_giou`` of one set of predictions, given its pairing."""
        return {
            "loss_class": self.loss_class(outputs["pred_logits"], targets, indices, num_boxes),
            **self.loss_boxes(outputs["pred_boxes"], targets, indices, num_boxes),
        }

    def loss_class(self, logits: Tensor, targets: list[dict[str, Tensor]], indices: Indices, num_boxes: float) -> Tensor:
        """Focal loss against one-hot targets (all zero for unpaired queries): ``mean over queries,
        summed, / num_boxes * Q``, as Deformable DETR.

        Args:
            logits: ``(B, Q, K)``.
        """
        if logits.shape[-1] != self.num_classes:
            raise ValueError(f"pred_logits have {logits.shape[-1]} classes, the criterion {self.num_classes}")
        num_queries = logits.shape[1]
        if num_queries == 0:
            return logits.sum()
        batch_idx, query_idx = _flat_query_indices(indices, logits.device)
        labels = torch.cat([t["labels"][tgt] for t, (_, tgt) in zip(targets, indices)]).to(logits.device)
        onehot = torch.zeros_like(logits)
        onehot[batch_idx, query_idx, labels] = 1
        loss = sigmoid_focal_loss(logits, onehot, self.focal_alpha, self.focal_gamma)
        return loss.mean(1).sum() / num_boxes * num_queries

    def loss_boxes(self, pred_boxes: Tensor, targets: list[dict[str, Tensor]], indices: Indices, num_boxes: float) -> dict[str, Tensor]:
        """L1 and ``1 - GIoU`` (with ``giou_eps``) of paired boxes, each summed and divided by ``num_boxes``.

        Args:
            pred_boxes: ``(B, Q, 4)`` normalised cxcywh.
        """
        batch_idx, query_idx = _flat_query_indices(indices, pred_boxes.device)
        src = pred_boxes[batch_idx, query_idx]
        tgt = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)]).to(src)
        loss_bbox = F.l1_loss(src, tgt, reduction="none").sum() / num_boxes
        giou = torch.diag(generalized_box_iou(box_cxcywh_to_xyxy(src), box_cxcywh_to_xyxy(tgt), self.giou_eps))
        loss_giou = (1 - giou).sum() / num_boxes
        return {"loss_bbox": loss_bbox, "loss_giou": loss_giou}


def _flat_query_indices(indices: Indices, device: torch.device) -> tuple[Tensor, Tensor]:
    """Per-image ``(query_idx, tgt_idx)`` -> flat ``(batch_idx, query_idx)`` over the batch."""
    batch_idx = torch.cat([torch.full_like(src, b) for b, (src, _) in enumerate(indices)])
    query_idx = torch.cat([src for src, _ in indices])
    return batch_idx.to(device), query_idx.to(device)


def _repeat_targets(target: dict[str, Tensor], k: int) -> dict[str, Tensor]:
    return {"labels": target["labels"].repeat(k), "boxes": target["boxes"].repeat(k, 1)}


def _binary_targets(target: dict[str, Tensor]) -> dict[str, Tensor]:
    """The same boxes, every label replaced by class 0."""
    return {"labels": torch.zeros_like(target["labels"]), "boxes": target["boxes"]}


def _suffixed(losses: dict[str, Tensor], suffix: str) -> dict[str, Tensor]:
    return {key + suffix: value for key, value in losses.items()}


def _num_boxes(targets: list[dict[str, Tensor]], device: torch.device) -> float:
    """Targets per image batch, averaged over distributed ranks when initialised, at least 1."""
    count = torch.tensor([float(sum(len(t["labels"]) for t in targets))], device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(count)
        count = count / dist.get_world_size()
    return count.clamp(min=1).item()
