"""The objects of the built-in ``glyphs`` dataset: five digits and five letters, drawn as strokes.

Every glyph is a set of polylines in a unit box (0.6 wide, 1 tall) drawn with PIL's line
rasteriser, so no font is involved and the pixels depend only on the seed and Pillow. Each object
gets its own slant (italic shear), rotation (at most 20 degrees, so that no glyph turns into another)
and stroke width. The classes avoid look-alikes (no 0/O, 1/I, 5/S, 8/B, 6/9).
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from litedetr.data.scene import SceneKind

__all__ = ["GLYPH_CLASSES", "GLYPHS"]

Stroke = list[tuple[float, float]]


def _arc(cx: float, cy: float, rx: float, ry: float, start: float, end: float, steps: int = 12) -> Stroke:
    """Points of an elliptical arc from ``start`` to ``end`` degrees; 0 points right, 90 down (image axes)."""
    angles = np.radians(np.linspace(start, end, steps + 1))
    return [(cx + rx * math.cos(a), cy + ry * math.sin(a)) for a in angles]


_STROKES: dict[str, list[Stroke]] = {
    "digit 2": [_arc(0.3, 0.28, 0.26, 0.24, 180, 390) + [(0.03, 1.0), (0.58, 1.0)]],
    "digit 3": [_arc(0.3, 0.26, 0.25, 0.23, 200, 450), _arc(0.3, 0.73, 0.28, 0.26, 270, 520)],
    "digit 4": [[(0.44, 1.0), (0.44, 0.0), (0.02, 0.68), (0.58, 0.68)]],
    "digit 5": [[(0.55, 0.0), (0.12, 0.0), (0.08, 0.46)], _arc(0.3, 0.68, 0.27, 0.31, 215, 500)],
    "digit 7": [[(0.02, 0.0), (0.58, 0.0), (0.2, 1.0)]],
    "letter A": [[(0.0, 1.0), (0.3, 0.0), (0.6, 1.0)], [(0.12, 0.64), (0.48, 0.64)]],
    "letter E": [[(0.56, 0.0), (0.05, 0.0), (0.05, 1.0), (0.56, 1.0)], [(0.05, 0.5), (0.45, 0.5)]],
    "letter H": [[(0.05, 0.0), (0.05, 1.0)], [(0.55, 0.0), (0.55, 1.0)], [(0.05, 0.5), (0.55, 0.5)]],
    "letter K": [[(0.07, 0.0), (0.07, 1.0)], [(0.56, 0.0), (0.07, 0.62)], [(0.24, 0.42), (0.58, 1.0)]],
    "letter R": [[(0.07, 1.0), (0.07, 0.0), (0.33, 0.0)] + _arc(0.33, 0.26, 0.22, 0.26, 270, 450) + [(0.07, 0.52)], [(0.3, 0.52), (0.58, 1.0)]],
}

GLYPH_CLASSES = tuple(_STROKES)
"""Category names (``"digit 2"``, ..., ``"letter R"``); their COCO category ids are 1, 2, ... in this order."""


def _place(stroke: Stroke, cx: float, cy: float, side: float, angle: float, slant: float) -> Stroke:
    """``stroke`` scaled to ``side`` pixels tall, slanted, rotated by ``angle`` (radians) and centred on ``(cx, cy)``."""
    c, s = math.cos(angle), math.sin(angle)
    placed = []
    for x, y in stroke:
        x, y = (x - 0.3) * side, (y - 0.5) * side
        x -= slant * y
        placed.append((cx + x * c - y * s, cy + x * s + y * c))
    return placed


def _glyph_mask(rng: np.random.Generator, label: int, size: tuple[int, int], cx: float, cy: float, side: float) -> np.ndarray:
    """``(H, W)`` bool mask of one glyph of class ``label``, ``side`` pixels tall, in a random pose and stroke width."""
    angle, slant = float(rng.uniform(-math.pi / 9, math.pi / 9)), float(rng.uniform(-0.25, 0.25))
    width = max(1, round(side * float(rng.uniform(0.09, 0.15))))
    canvas = Image.new("L", (size[1], size[0]), 0)
    draw = ImageDraw.Draw(canvas)
    for stroke in _STROKES[GLYPH_CLASSES[label]]:
        draw.line(_place(stroke, cx, cy, side, angle, slant), fill=1, width=width, joint="curve")
    return np.asarray(canvas, dtype=bool)


GLYPHS = SceneKind(classes=GLYPH_CLASSES, supercategory="glyph", draw_mask=_glyph_mask, size_factor=1.4)
"""Digits 2, 3, 4, 5, 7 and letters A, E, H, K, R."""
