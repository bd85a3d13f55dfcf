"""DETR/DINO training augmentations on torchvision.transforms.v2 box types.

DETR's recipe is: horizontal flip, then either the multi-scale resize alone, or a resize of the
short side to one of ``(400, 500, 600)`` and a random crop of 384-600 px sides followed by the
multi-scale resize. The multi-scale resize (short side from ``DetectorConfig.min_size``, long side
at most ``max_size``) happens in the detector's batching, so here are the flip and the crop branch.
:meth:`AugmentConfig.scaled` shrinks the crop sizes along with the image size for CPU training.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

__all__ = ["AugmentConfig", "RandomSizeCrop", "train_transform"]


@dataclass(frozen=True)
class AugmentConfig:
    """Attributes:
    flip_prob: probability of a horizontal flip.
    crop_prob: probability of the resize-and-crop branch.
    crop_resize: short sides the branch first resizes to (one drawn at random).
    crop_size: ``(min, max)`` side of the random crop, in pixels after that resize.
    """

    flip_prob: float = 0.5
    crop_prob: float = 0.5
    crop_resize: tuple[int, ...] = (400, 500, 600)
    crop_size: tuple[int, int] = (384, 600)

    def scaled(self, factor: float) -> AugmentConfig:
        """The same recipe for images ``factor`` times DETR's 800 px short side."""
        return AugmentConfig(
            self.flip_prob,
            self.crop_prob,
            tuple(round(s * factor) for s in self.crop_resize),
            (round(self.crop_size[0] * factor), round(self.crop_size[1] * factor)),
        )


class RandomSizeCrop(v2.Transform):
    """Crop a random region whose sides are uniform in ``[min_size, max_size]`` (capped by the image)."""

    def __init__(self, min_size: int, max_size: int):
        super().__init__()
        self.min_size, self.max_size = min_size, max_size

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = v2.query_size(flat_inputs)
        ch = int(torch.randint(min(self.min_size, h), min(h, self.max_size) + 1, ()))
        cw = int(torch.randint(min(self.min_size, w), min(w, self.max_size) + 1, ()))
        top = int(torch.randint(0, h - ch + 1, ()))
        left = int(torch.randint(0, w - cw + 1, ()))
        return {"top": top, "left": left, "height": ch, "width": cw}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.crop, inpt, **params)


def train_transform(config: AugmentConfig) -> v2.Transform:
    """``transform(image, target)`` for uint8 images and targets with ``boxes`` and ``labels``.

    Boxes are clipped to the crop and those left without area are dropped with their labels.
    """
    crop = v2.Compose([v2.RandomChoice([v2.Resize(s) for s in config.crop_resize]), RandomSizeCrop(*config.crop_size)])
    return v2.Compose(
        [
            v2.RandomHorizontalFlip(config.flip_prob),
            v2.RandomApply([crop], p=config.crop_prob),
            v2.ClampBoundingBoxes(),
            v2.SanitizeBoundingBoxes(min_size=1.0),
        ]
    )
