"""Drawing helpers shared by ``predict``, ``explain`` and ``export``: detections on images, test scenes."""

from __future__ import annotations

import colorsys
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from litedetr.data.synthetic import render_image

__all__ = ["label_color", "draw_detections", "synthetic_scene"]


def label_color(label: int) -> tuple[int, int, int]:
    """A saturated RGB colour per class label, well apart for neighbouring labels (golden-ratio hues)."""
    r, g, b = colorsys.hsv_to_rgb((label * 0.618034) % 1.0, 0.85, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def draw_detections(image: Image.Image, boxes: Tensor, scores: Tensor, labels: Tensor, names: Sequence[str]) -> Image.Image:
    """A copy of ``image`` with each box outlined and tagged ``name score`` on a filled label.

    Args:
        image: the original image (any mode; drawn on as RGB).
        boxes: ``(N, 4)`` xyxy pixels of ``image``.
        scores, labels: ``(N,)``.
        names: ``N`` class names.

    Line width and font size scale with the image so labels stay legible on large and small images.
    """
    out = image.convert("RGB")
    draw = ImageDraw.Draw(out)
    side = max(out.size)
    width = max(2, round(side / 300))
    font = ImageFont.load_default(size=max(12, round(side / 45)))
    for box, score, label, name in zip(boxes.tolist(), scores.tolist(), labels.tolist(), names):
        color = label_color(int(label))
        draw.rectangle(box, outline=color, width=width)
        text = f"{name} {score:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tw, th = right - left, bottom - top
        x = min(max(box[0], 0), max(out.width - tw - 2 * width, 0))
        y = box[1] - th - 2 * width if box[1] - th - 2 * width >= 0 else box[1]
        draw.rectangle((x, y, x + tw + 2 * width, y + th + 2 * width), fill=color)
        luminance = 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2]
        draw.text((x + width - left, y + width - top), text, fill=(0, 0, 0) if luminance > 150 else (255, 255, 255), font=font)
    return out


def synthetic_scene(height: int, width: int, seed: int = 0) -> Image.Image:
    """A real-looking test image: a scene of the built-in synthetic dataset (textured background, shapes).

    Used to check exported graphs and to time them on inputs with image statistics (edges, flat
    regions, texture) rather than pure noise.
    """
    pixels, _ = render_image(np.random.default_rng(seed), (height, width), max_objects=6)
    return Image.fromarray(pixels)
