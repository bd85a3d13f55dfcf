"""Turn what users pass to :meth:`Detector.predict` into ``(3, H, W)`` float tensors in [0, 1].

Accepted, one or a list of them: image file paths, PIL images, numpy arrays ``(H, W, 3)`` uint8 (RGB)
and tensors ``(3, H, W)`` (float in [0, 1] or uint8); a ``(B, 3, H, W)`` tensor counts as ``B``
images. Files are read lazily, a window of a few batches at a time. Files and PIL images go through one rule
(:func:`rgb_image`: EXIF orientation, 16-bit grayscale), so a photo gives the same boxes either way.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

__all__ = [
    "ImageInput",
    "IMAGE_SUFFIXES",
    "as_image_list",
    "find_images",
    "load_image",
    "rgb_image",
    "to_image_tensor",
    "batches_by_size",
    "SIZE_WINDOW_BATCHES",
]

ImageInput = str | os.PathLike | Image.Image | np.ndarray | Tensor
"""One image: a file path, a PIL image, an ``(H, W, 3)`` uint8 array or a ``(3, H, W)`` tensor."""


_WIDE_INTEGER_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
"""Pillow's modes of 16-bit (and 32-bit integer) grayscale, which ``convert("RGB")`` would clip to white."""


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def find_images(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Files as given, directories expanded to their image files (sorted, not recursive)."""
    found = []
    for path in map(Path, paths):
        if path.is_dir():
            found.extend(sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()))
        elif path.exists():
            found.append(path)
        else:
            raise ValueError(f"{path}: no such image file or directory")
    if not found:
        raise ValueError(f"no image files in {', '.join(map(str, paths))}")
    return found


def load_image(path: str | os.PathLike) -> Image.Image:
    """Read an image file as 8-bit RGB, the one rule for training, evaluation and prediction
    (:func:`rgb_image`: EXIF orientation, modes).

    Raises:
        ValueError: the file is missing, not a readable image, or of a mode that cannot be read
            faithfully (the message names it).
    """
    try:
        with Image.open(path) as image:
            image.load()
    except FileNotFoundError:
        raise ValueError(f"{path}: no such image file") from None
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as err:
        raise ValueError(f"{path}: not a readable image ({err})") from None
    return rgb_image(image, str(path))


def rgb_image(image: Image.Image, name: str = "image") -> Image.Image:
    """A PIL image as the 8-bit RGB image a detector sees, whether it came from a file or from the caller.

    The EXIF orientation is applied (as detectron2 and Ultralytics do). Palette, CMYK, grayscale
    and alpha modes are converted to RGB (alpha dropped); 16-bit grayscale is scaled to 8 bits
    (``value / 257``); floating-point and wider-than-16-bit integer images are refused by name.
    """
    image = ImageOps.exif_transpose(image)
    if image.mode in _WIDE_INTEGER_MODES:
        pixels = np.asarray(image).astype(np.int64)
        if pixels.size and (pixels.min() < 0 or pixels.max() > 65535):
            raise ValueError(f"{name}: integer pixels outside 0..65535 (mode {image.mode}); save it as an 8- or 16-bit image")
        image = Image.fromarray(np.rint(pixels / 257).astype(np.uint8), "L")
    elif image.mode == "F":
        raise ValueError(f"{name}: floating-point pixels (mode F) have no defined range; save it as an 8- or 16-bit image")
    return image.convert("RGB")


def to_image_tensor(image: ImageInput) -> Tensor:
    """One image -> ``(3, H, W)`` float32 tensor in [0, 1] (tensors keep their device)."""
    if isinstance(image, (str, os.PathLike)):
        image = load_image(image)
    if isinstance(image, Image.Image):
        image = np.array(rgb_image(image))
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"numpy images must be (H, W, 3) uint8 RGB, got {image.shape} {image.dtype}")
        return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 255.0
    if isinstance(image, Tensor):
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"image tensors must be (3, H, W), got shape {tuple(image.shape)}")
        if image.dtype == torch.uint8:
            return image.float() / 255.0
        if not image.is_floating_point():
            raise ValueError(f"image tensors must be float in [0, 1] or uint8, got {image.dtype}")
        if image.numel() and (image.min() < 0 or image.max() > 1):
            raise ValueError(f"float image tensors must lie in [0, 1], got values in [{image.min():.3g}, {image.max():.3g}]")
        return image.float()
    raise ValueError(f"unsupported image type {type(image).__name__}: pass file paths, PIL images, numpy arrays or tensors")


def as_image_list(inputs: ImageInput | Sequence[ImageInput]) -> list[ImageInput]:
    """One image or many -> a list of images (a ``(B, 3, H, W)`` tensor gives ``B``)."""
    if isinstance(inputs, Tensor) and inputs.dim() == 4:
        return list(inputs)
    if isinstance(inputs, (str, os.PathLike, Image.Image, np.ndarray, Tensor)):
        return [inputs]
    if not isinstance(inputs, Sequence):
        raise ValueError(f"unsupported image type {type(inputs).__name__}: pass file paths, PIL images, numpy arrays or tensors")
    images = list(inputs)
    if not images:
        raise ValueError("no images given")
    return images


SIZE_WINDOW_BATCHES = 8
""":func:`batches_by_size` sorts this many batches' worth of consecutive images at a time."""


def batches_by_size(images: list[ImageInput], batch_size: int, window: int | None = None) -> Iterator[list[tuple[int, Tensor]]]:
    """Batches of at most ``batch_size`` ``(index into images, image)`` pairs, padded as little as possible.

    Every ``window`` consecutive images (default ``SIZE_WINDOW_BATCHES * batch_size``) are converted
    (files read) when reached and sorted by aspect ratio, then area, so that images of one size share
    a batch: a batch of equally sized images needs no padding, and its predictions equal each image's
    alone (what padding changes: :meth:`litedetr.models.Detector.predict`).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    window = window or SIZE_WINDOW_BATCHES * batch_size
    for start in range(0, len(images), window):
        read = [(start + i, to_image_tensor(image)) for i, image in enumerate(images[start : start + window])]
        read.sort(key=lambda item: (item[1].shape[1] / item[1].shape[2], item[1].shape[1] * item[1].shape[2], item[0]))
        for first in range(0, len(read), batch_size):
            yield read[first : first + batch_size]
