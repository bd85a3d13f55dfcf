"""COCO's 80 object classes under their ids in the 91-id layout, which the released COCO checkpoints
of DINO, Lite-DINO, Deformable DETR and H-DETR use as class indices (91 rows; ids absent from COCO's
annotations are unused rows), and :func:`class_key`, the form in which class names are compared."""

from __future__ import annotations

import re

__all__ = ["COCO_CLASSES", "COCO_NUM_CLASSES", "coco_class_names", "class_key"]

COCO_NUM_CLASSES = 91
"""Rows of the released COCO checkpoints' class heads (ids 0..90)."""

COCO_CLASSES: dict[int, str] = {
    1: "person", 2: "bicycle", 3: "car", 4: "motorcycle", 5: "airplane", 6: "bus", 7: "train", 8: "truck",
    9: "boat", 10: "traffic light", 11: "fire hydrant", 13: "stop sign", 14: "parking meter", 15: "bench",
    16: "bird", 17: "cat", 18: "dog", 19: "horse", 20: "sheep", 21: "cow", 22: "elephant", 23: "bear",
    24: "zebra", 25: "giraffe", 27: "backpack", 28: "umbrella", 31: "handbag", 32: "tie", 33: "suitcase",
    34: "frisbee", 35: "skis", 36: "snowboard", 37: "sports ball", 38: "kite", 39: "baseball bat",
    40: "baseball glove", 41: "skateboard", 42: "surfboard", 43: "tennis racket", 44: "bottle",
    46: "wine glass", 47: "cup", 48: "fork", 49: "knife", 50: "spoon", 51: "bowl", 52: "banana", 53: "apple",
    54: "sandwich", 55: "orange", 56: "broccoli", 57: "carrot", 58: "hot dog", 59: "pizza", 60: "donut",
    61: "cake", 62: "chair", 63: "couch", 64: "potted plant", 65: "bed", 67: "dining table", 70: "toilet",
    72: "tv", 73: "laptop", 74: "mouse", 75: "remote", 76: "keyboard", 77: "cell phone", 78: "microwave",
    79: "oven", 80: "toaster", 81: "sink", 82: "refrigerator", 84: "book", 85: "clock", 86: "vase",
    87: "scissors", 88: "teddy bear", 89: "hair drier", 90: "toothbrush",
}  # fmt: skip

_ALIASES = {
    # Pascal VOC's names of COCO classes, and common spellings
    "aeroplane": "airplane",
    "motorbike": "motorcycle",
    "sofa": "couch",
    "tvmonitor": "tv",
    "diningtable": "dining table",
    "pottedplant": "potted plant",
    "hairdryer": "hair drier",
    "doughnut": "donut",
    "cellphone": "cell phone",
    "mobilephone": "cell phone",
}
"""Other names of COCO classes, as :func:`class_key` writes them, and the COCO name they stand for."""


def class_key(name: str) -> str:
    """``name`` as compared across datasets: lower case, without spaces, underscores or hyphens, and
    with the aliases of COCO classes (VOC's ``tvmonitor``, ``aeroplane``, ...) replaced by COCO's name."""
    key = re.sub(r"[\s_\-]+", "", name.lower())
    alias = _ALIASES.get(key)
    return re.sub(r"\s+", "", alias) if alias else key


def coco_class_names() -> tuple[str, ...]:
    """The name of each of the 91 rows of a released COCO checkpoint (``""`` for the unused ids)."""
    return tuple(COCO_CLASSES.get(i, "") for i in range(COCO_NUM_CLASSES))
