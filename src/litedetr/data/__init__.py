"""COCO-format datasets, the DETR augmentations and the built-in synthetic datasets."""

from litedetr.data.coco import CocoDetection, Split, collate, find_split
from litedetr.data.synthetic import CLASSES, GLYPH_CLASSES, KINDS, SyntheticSpec, write_synthetic_dataset
from litedetr.data.transforms import AugmentConfig, train_transform

__all__ = [
    "CocoDetection",
    "Split",
    "collate",
    "find_split",
    "CLASSES",
    "GLYPH_CLASSES",
    "KINDS",
    "SyntheticSpec",
    "write_synthetic_dataset",
    "AugmentConfig",
    "train_transform",
]
