"""litedetr: efficient DETR-family detectors with the Lite DETR encoder."""

__version__ = "0.1.0"
