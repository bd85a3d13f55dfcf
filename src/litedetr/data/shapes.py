"""The objects of the built-in ``shapes`` dataset: five shapes that differ by outline only."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from litedetr.data.scene import SceneKind

__all__ = ["CLASSES", "SHAPES"]

CLASSES = ("circle", "square", "triangle", "cross", "star")
"""Category names; their COCO category ids are 1, 2, ... in this order."""


def _polygon(kind: str, cx: float, cy: float, s: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of a shape of side ``s`` centred on ``(cx, cy)``, rotated by ``angle`` (radians)."""
    if kind == "square":
        pts = [(-0.5, -0.5), (0.5, -0.5), (0.5, 0.5), (-0.5, 0.5)]
    elif kind == "triangle":
        pts = [(math.cos(a) * 0.55, math.sin(a) * 0.55 + 0.1) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    elif kind == "cross":
        a, b = 0.5, 0.17
        pts = [(-b, -a), (b, -a), (b, -b), (a, -b), (a, b), (b, b), (b, a), (-b, a), (-b, b), (-a, b), (-a, -b), (-b, -b)]
    elif kind == "star":
        pts = [(math.cos(t) * r, math.sin(t) * r) for i in range(10) for t, r in [(-math.pi / 2 + i * math.pi / 5, 0.5 if i % 2 == 0 else 0.22)]]
    else:
        raise ValueError(f"no polygon for {kind!r}")
    c, si = math.cos(angle), math.sin(angle)
    return [(cx + s * (x * c - y * si), cy + s * (x * si + y * c)) for x, y in pts]


def _shape_mask(rng: np.random.Generator, label: int, size: tuple[int, int], cx: float, cy: float, side: float) -> np.ndarray:
    """``(H, W)`` bool mask of one shape of class ``label`` at a random rotation."""
    kind, angle = CLASSES[label], float(rng.uniform(0, 2 * math.pi))
    canvas = Image.new("L", (size[1], size[0]), 0)
    draw = ImageDraw.Draw(canvas)
    if kind == "circle":
        r = side / 2
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=1)
    else:
        draw.polygon(_polygon(kind, cx, cy, side, angle), fill=1)
    return np.asarray(canvas, dtype=bool)


SHAPES = SceneKind(classes=CLASSES, supercategory="shape", draw_mask=_shape_mask)
"""Circles, squares, triangles, crosses and stars."""
