"""Images in, padded normalised batch out: resizing, ImageNet normalisation, padding masks."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ImageBatch", "resized_size", "resize_and_normalize", "batch_images", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ImageBatch:
    """Attributes:
    tensors: ``(B, 3, H, W)`` normalised, zero-padded at the bottom/right.
    mask: ``(B, H, W)`` bool, True = padding.
    sizes: ``(B, 2)`` long, each image's original ``(H, W)`` (before resizing).
    """

    tensors: Tensor
    mask: Tensor
    sizes: Tensor


def resized_size(h: int, w: int, min_size: int, max_size: int) -> tuple[int, int]:
    """Scale so the short side is ``min_size`` unless the long side would exceed ``max_size``."""
    scale = min(min_size / min(h, w), max_size / max(h, w))
    return max(1, round(h * scale)), max(1, round(w * scale))


def resize_and_normalize(image: Tensor, min_size: int, max_size: int) -> Tensor:
    """``(3, H, W)`` in [0, 1] -> ``(3, h, w)`` resized (:func:`resized_size`; bilinear, antialiased) and
    ImageNet-normalised."""
    mean = torch.tensor(IMAGENET_MEAN, device=image.device)[:, None, None]
    std = torch.tensor(IMAGENET_STD, device=image.device)[:, None, None]
    size = resized_size(image.shape[1], image.shape[2], min_size, max_size)
    if size != tuple(image.shape[1:]):
        image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]
    return (image - mean) / std


def batch_images(images: list[Tensor] | Tensor, min_sizes: tuple[int, ...], max_size: int, training: bool) -> ImageBatch:
    """Resize (random short side from ``min_sizes`` in training, the largest at eval), normalise, pad.

    Args:
        images: ``(3, H_i, W_i)`` float tensors in [0, 1], a list or a ``(B, 3, H, W)`` tensor.
    """
    if isinstance(images, Tensor) and images.dim() == 4:
        images = list(images)
    if not images:
        raise ValueError("no images given")
    for i, img in enumerate(images):
        if img.dim() != 3 or img.shape[0] != 3:
            raise ValueError(f"image {i} must be a (3, H, W) tensor, got shape {tuple(img.shape)}")
        if not img.is_floating_point():
            raise ValueError(f"image {i} must be float in [0, 1], got dtype {img.dtype}")
    # drawn from torch's RNG, which the trainer seeds per rank and checkpoints (reruns and resumes repeat it);
    # nothing is drawn when there is no choice
    if training and len(min_sizes) > 1:
        min_size = min_sizes[int(torch.randint(len(min_sizes), ()))]
    else:
        min_size = max(min_sizes)
    resized = [resize_and_normalize(img, min_size, max_size) for img in images]
    h = max(img.shape[1] for img in resized)
    w = max(img.shape[2] for img in resized)
    tensors = resized[0].new_zeros(len(resized), 3, h, w)
    mask = torch.ones(len(resized), h, w, dtype=torch.bool, device=tensors.device)
    for i, img in enumerate(resized):
        tensors[i, :, : img.shape[1], : img.shape[2]] = img
        mask[i, : img.shape[1], : img.shape[2]] = False
    sizes = torch.tensor([img.shape[1:] for img in images], dtype=torch.long, device=tensors.device)
    return ImageBatch(tensors, mask, sizes)
