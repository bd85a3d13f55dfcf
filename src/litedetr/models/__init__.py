"""Detectors, backbones, criterion, presets and checkpoints."""

from __future__ import annotations

from typing import Any

from litedetr.models.checkpoint import read_config, save_model
from litedetr.models.config import PRESETS, DetectorConfig, EncoderConfig, get_config
from litedetr.models.detector import Detector, convert_official_checkpoint, load_model

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
]


def build_model(name: str, backbone_weights: str | None = None, **overrides: Any) -> Detector:
    """A randomly initialised detector from a named preset, e.g. ``build_model("lite-dino-r50-h3l1-2x3", num_classes=20)``.

    Args:
        name: preset name (``litedetr models`` lists them).
        backbone_weights: optional local file of ImageNet backbone weights.
        overrides: :class:`DetectorConfig` fields to change.
    """
    return Detector(get_config(name, **overrides), backbone_weights=backbone_weights)
