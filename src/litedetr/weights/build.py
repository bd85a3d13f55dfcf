"""A detector from a named preset, with its starting weights: random, ImageNet backbone weights, or a trained checkpoint."""

from __future__ import annotations

import os
from typing import Any

from litedetr.models.config import get_config
from litedetr.models.detector import Detector
from litedetr.weights.backbone import load_backbone_weights
from litedetr.weights.loading import init_from_checkpoint

__all__ = ["build_model"]


def build_model(
    name: str, backbone_weights: str | os.PathLike[str] | None = None, init: str | os.PathLike[str] | None = None, init_weights: str = "auto", **overrides: Any
) -> Detector:
    """A detector from a named preset, e.g. ``build_model("lite-dino-r50-h3l1-2x3", num_classes=20)``, in training mode.

    Random weights (nothing downloads), unless ``backbone_weights`` or ``init`` say otherwise.

    Args:
        name: preset name (``litedetr models`` lists them).
        backbone_weights: ImageNet weights for the backbone: ``"imagenet"`` (torchvision's or timm's,
            through their caches; :func:`~litedetr.weights.backbone.load_backbone_weights`) or a local
            file of a torchvision state dict.
        init: a trained checkpoint to start from (:func:`~litedetr.weights.loading.init_from_checkpoint`):
            a litedetr model file or a released ``.pth`` of the preset's family; name your classes
            (``class_names=...``) so that those the checkpoint knows keep their rows.
        init_weights: of an ``init`` holding both, its EMA (``auto``, ``ema``) or its model weights (``model``).
        overrides: :class:`~litedetr.models.DetectorConfig` fields to change.
    """
    if init is not None and backbone_weights is not None:
        raise ValueError("pass init or backbone_weights, not both: the checkpoint's backbone would replace the ImageNet weights")
    model = Detector(get_config(name, **overrides))
    if backbone_weights is not None:
        load_backbone_weights(model.backbone, backbone_weights)
    if init is not None:
        init_from_checkpoint(model, init, init_weights)
    return model
