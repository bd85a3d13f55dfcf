"""Detectors: their parts, criterion, typed configs and named presets (reading and writing their weights: :mod:`litedetr.weights`)."""

from __future__ import annotations

from litedetr.models.config import PRESETS, DetectorConfig, EncoderConfig, get_config
from litedetr.models.detector import Detector
from litedetr.models.exported import ExportedDetector

__all__ = ["Detector", "DetectorConfig", "EncoderConfig", "PRESETS", "get_config", "ExportedDetector"]
