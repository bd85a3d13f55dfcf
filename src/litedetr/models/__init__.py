"""Detectors, backbones, criterion, presets and checkpoints."""

from __future__ import annotations

from typing import Any

from litedetr.models.checkpoint import read_config, save_model
from litedetr.models.config import PRESETS, DetectorConfig, EncoderConfig, get_config
from litedetr.models.detector import Detector, convert_official_checkpoint, load_model
from litedetr.models.exported import ExportedDetector
from litedetr.models.pretrained import init_from_checkpoint

__all__ = [
    "build_model",
    "Detector",
    "DetectorConfig",
    "EncoderConfig",
    "PRESETS",
    "get_config",
    "save_model",
    "load_model",
    "read_config",
    "convert_official_checkpoint",
    "init_from_checkpoint",
    "ExportedDetector",
]


def build_model(name: str, backbone_weights: str | None = None, init: str | None = None, init_weights: str = "auto", **overrides: Any) -> Detector:
    """A detector from a named preset, e.g. ``build_model("lite-dino-r50-h3l1-2x3", num_classes=20)``.

    Random weights (nothing downloads), unless ``backbone_weights`` or ``init`` say otherwise.

    Args:
        name: preset name (``litedetr models`` lists them).
        backbone_weights: ImageNet weights for the backbone: ``"imagenet"`` (torchvision's or timm's,
            through their caches) or a local file of a torchvision state dict.
        init: a trained checkpoint to start from (:func:`~litedetr.models.pretrained.init_from_checkpoint`):
            a litedetr model file or a released ``.pth`` of the preset's family; name your classes
            (``class_names=...``) so that those the checkpoint knows keep their rows.
        init_weights: of an ``init`` holding both, its EMA (``auto``, ``ema``) or its model weights (``model``).
        overrides: :class:`DetectorConfig` fields to change.
    """
    if init is not None and backbone_weights is not None:
        raise ValueError("pass init or backbone_weights, not both: the checkpoint's backbone would replace the ImageNet weights")
    model = Detector(get_config(name, **overrides), backbone_weights=backbone_weights)
    if init is not None:
        init_from_checkpoint(model, init, init_weights)
    return model
