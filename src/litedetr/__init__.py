"""litedetr: efficient DETR-family detectors with the Lite DETR encoder.

The public names are imported on first use (with torch), so that ``litedetr --help`` starts fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

_HOMES = {
    "build_model": "litedetr.weights",
    "load_model": "litedetr.weights",
    "load_checkpoint": "litedetr.weights",
    "save_model": "litedetr.weights",
    "Detector": "litedetr.models",
    "DetectorConfig": "litedetr.models",
    "ExportedDetector": "litedetr.models",
    "PRESETS": "litedetr.models",
}
__all__ = ["build_model", "load_model", "load_checkpoint", "save_model", "Detector", "DetectorConfig", "ExportedDetector", "PRESETS", "__version__"]

if TYPE_CHECKING:
    from litedetr.models import PRESETS, Detector, DetectorConfig, ExportedDetector
    from litedetr.weights import build_model, load_checkpoint, load_model, save_model


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'litedetr' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
