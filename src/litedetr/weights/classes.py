"""Class names, and carrying a checkpoint's class rows over to a model's classes by name.

- COCO's 80 object classes under their ids in the 91-id layout, which the released COCO checkpoints of
  DINO, Lite-DINO, Deformable DETR and H-DETR use as class indices (91 rows; ids absent from COCO's
  annotations are unused rows).
- :func:`class_key`, the form in which class names are compared (case, spaces, underscores and hyphens
  ignored; VOC's names of COCO classes accepted), and :func:`match_classes`, the class map it gives.
- :func:`adapt_class_tensor`: a class-dependent tensor with the mapped rows taken from the checkpoint.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import Tensor

from litedetr.weights.keys import LABEL_EMBED, OBJECTNESS_HEAD
from litedetr.weights.state_dict import ConversionError

__all__ = ["COCO_CLASSES", "COCO_NUM_CLASSES", "coco_class_names", "class_key", "match_classes", "adapt_class_tensor"]

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


def match_classes(ours: Sequence[str], theirs: Sequence[str]) -> dict[int, int]:
    """``{our label: their label}`` for each of our class names that one of theirs matches (:func:`class_key`)."""
    index: dict[str, int] = {}
    for j, name in enumerate(theirs):
        if name:
            index.setdefault(class_key(name), j)
    return {i: index[class_key(name)] for i, name in enumerate(ours) if class_key(name) in index}


def adapt_class_tensor(key: str, ours: Tensor, theirs: Tensor, mapping: dict[int, int], num_classes: int, binary_proposals: bool) -> Tensor:
    """``ours`` (as freshly initialised) with the rows ``mapping`` carries over from ``theirs``.

    Denoising's label embedding also takes DINO's extra label row (after the classes); with
    ``binary_proposals``, the proposals' class head takes row 0, the objectness score, whatever the classes.
    """
    if ours.shape[1:] != theirs.shape[1:]:
        raise ConversionError(f"{key}: checkpoint {tuple(theirs.shape)} vs model {tuple(ours.shape)}: another width (d_model)")
    adapted = ours.detach().clone()
    for i, j in mapping.items():
        adapted[i] = theirs[j]
    if re.fullmatch(LABEL_EMBED, key):  # DINO's extra label row, after the classes
        adapted[num_classes:] = theirs[theirs.shape[0] - (ours.shape[0] - num_classes) :]
    if binary_proposals and re.fullmatch(OBJECTNESS_HEAD, key):
        adapted[0] = theirs[0]
    return adapted
