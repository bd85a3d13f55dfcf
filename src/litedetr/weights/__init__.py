"""Weights: litedetr's model files, the original code bases' checkpoints, starting a model from either
(class rows carried over by name), COCO's class names, and backbones' ImageNet weights.

The two loaders are :func:`load_model` (our model files) and :func:`load_checkpoint` (a checkpoint of
another code base, with or without a class map); both run :mod:`litedetr.weights.loading`'s pipeline.
"""

from __future__ import annotations

from litedetr.weights.backbone import IMAGENET, WeightsUnavailable, load_backbone_weights
from litedetr.weights.build import build_model
from litedetr.weights.files import read_config, save_model
from litedetr.weights.loading import InitReport, init_from_checkpoint, load_checkpoint, load_model
from litedetr.weights.official import WEIGHTS
from litedetr.weights.state_dict import ConversionError

__all__ = [
    "build_model",
    "load_model",
    "load_checkpoint",
    "save_model",
    "read_config",
    "init_from_checkpoint",
    "InitReport",
    "load_backbone_weights",
    "IMAGENET",
    "WEIGHTS",
    "WeightsUnavailable",
    "ConversionError",
]
