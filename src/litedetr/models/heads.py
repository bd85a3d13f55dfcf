"""Prediction heads on the decoder's outputs: a class and a box head per decoder layer.

DINO shares one pair across all layers; Deformable DETR and H-DETR (iterative box refinement) give
every layer its own. The box head of layer ``i`` is also the one the decoder refines layer ``i``'s
reference with, so the heads are passed to the decoder as :attr:`PredictionHeads.box_per_layer`.
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from litedetr.nn.decoder import MLP
from litedetr.ops import inverse_sigmoid

__all__ = ["PredictionHeads", "init_class_head", "init_box_head"]

PRIOR_PROBABILITY = 0.01
"""Focal-loss prior: every class head's bias starts at ``logit(0.01)``."""


def init_class_head(head: nn.Linear) -> None:
    """Bias at the focal-loss prior (every class starts at probability 0.01); the weight is left as built."""
    nn.init.constant_(head.bias, -math.log((1 - PRIOR_PROBABILITY) / PRIOR_PROBABILITY))


def init_box_head(head: MLP) -> None:
    """Zero last layer: a fresh box head predicts no change to its reference."""
    nn.init.zeros_(head.layers[-1].weight)
    nn.init.zeros_(head.layers[-1].bias)


class PredictionHeads(nn.Module):
    """Class logits and boxes of every decoder layer.

    Args:
        d_model: decoder channels.
        num_classes: ``K``.
        num_layers: decoder layers.
        shared: one pair of heads for all layers (DINO) instead of one per layer.
        inverse_sigmoid_eps: clamp of the reference boxes' inverse sigmoid (DINO 1e-3, Deformable DETR 1e-5).
    """

    def __init__(self, d_model: int, num_classes: int, num_layers: int, shared: bool, inverse_sigmoid_eps: float):
        super().__init__()
        count = 1 if shared else num_layers
        self.class_heads = nn.ModuleList(nn.Linear(d_model, num_classes) for _ in range(count))
        self.box_heads = nn.ModuleList(MLP(d_model, d_model, 4, 3) for _ in range(count))
        self.num_layers = num_layers
        self.inverse_sigmoid_eps = inverse_sigmoid_eps
        for class_head, box_head in zip(self.class_heads, self.box_heads):
            init_class_head(class_head)
            init_box_head(box_head)

    @property
    def box_per_layer(self) -> list[nn.Module]:
        """The box head of each decoder layer (the same module repeated when shared)."""
        return [self.box_heads[min(i, len(self.box_heads) - 1)] for i in range(self.num_layers)]

    @property
    def class_per_layer(self) -> list[nn.Module]:
        """The class head of each decoder layer (the same module repeated when shared)."""
        return [self.class_heads[min(i, len(self.class_heads) - 1)] for i in range(self.num_layers)]

    def forward(self, hidden: list[Tensor], references: list[Tensor]) -> list[dict[str, Tensor]]:
        """Per layer ``pred_logits (B, Q, K)`` and ``pred_boxes (B, Q, 4)`` (sigmoid cxcywh).

        Args:
            hidden: per layer ``(B, Q, C)`` decoder outputs.
            references: per layer ``(B, Q, 4)`` sigmoid boxes that layer's box delta applies to.
        """
        return [
            {"pred_logits": class_head(h), "pred_boxes": (box_head(h) + inverse_sigmoid(r, self.inverse_sigmoid_eps)).sigmoid()}
            for class_head, box_head, h, r in zip(self.class_per_layer, self.box_per_layer, hidden, references)
        ]
