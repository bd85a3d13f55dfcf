"""litedetr: efficient DETR-family detectors with the Lite DETR encoder."""

from litedetr.models import PRESETS, Detector, DetectorConfig, build_model, load_model, save_model

__version__ = "0.1.0"

__all__ = ["build_model", "load_model", "save_model", "Detector", "DetectorConfig", "PRESETS", "__version__"]
