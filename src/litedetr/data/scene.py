"""Scenes of the built-in synthetic datasets: objects of some kind on textured backgrounds.

What every built-in dataset shares: blotchy colour backgrounds with noise and thin clutter strokes
(which are not objects), object sizes spanning COCO's small (< 32^2 px), medium and large (>= 96^2 px)
areas, saturated colours drawn independently of the class, and occlusion: a later object hides part
of an earlier one, never more than :data:`MAX_HIDDEN` of it, and every box and area is that of the
object's visible pixels, as COCO annotates. What differs is how an object of a class is drawn: a
:class:`SceneKind`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["MAX_HIDDEN", "MaskFn", "SceneKind", "render_scene"]

MAX_HIDDEN = 0.4
"""The largest share of an object's pixels that objects drawn over it may hide."""

_SIZE_BANDS = ((0.25, 16, 32), (0.45, 45, 130), (0.3, 150, 240))
"""(probability, min side, max side) in pixels at 320 px images: small, medium and large objects."""

MaskFn = Callable[[np.random.Generator, int, tuple[int, int], float, float, float], np.ndarray]
"""``(rng, label, (H, W), cx, cy, side) -> (H, W) bool mask`` of one object of class ``label``,
centred on ``(cx, cy)`` and about ``side`` pixels across; it may draw its own pose from ``rng``."""


@dataclass(frozen=True)
class SceneKind:
    """One kind of synthetic object.

    Attributes:
        classes: category names; their COCO category ids are 1, 2, ... in this order.
        supercategory: the COCO ``supercategory`` of every class.
        draw_mask: draws one object (:data:`MaskFn`).
        size_factor: multiplies every object's drawn size, so that objects that cover little of their box
            (strokes) still span COCO's size ranges by area.
    """

    classes: tuple[str, ...]
    supercategory: str
    draw_mask: MaskFn
    size_factor: float = 1.0


def _background(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """``(H, W, 3)`` float in [0, 1]: smooth colour blotches, fine noise and thin clutter strokes."""
    h, w = size
    coarse = Image.fromarray((rng.random((6, 6, 3)) * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC)
    base = 0.25 + 0.5 * np.asarray(coarse, dtype=np.float32) / 255
    base = base * 0.6 + base.mean(-1, keepdims=True) * 0.4  # muted colours, so objects stand out by saturation
    image = base + rng.normal(0.0, 0.05, (h, w, 3)).astype(np.float32)
    strokes = Image.new("RGB", (w, h))
    draw = ImageDraw.Draw(strokes)
    for _ in range(int(rng.integers(3, 9))):
        x0, y0 = rng.random(2) * (w, h)
        x1, y1 = np.array([x0, y0]) + rng.normal(0, 0.25, 2) * (w, h)
        grey = int(rng.integers(60, 200))
        draw.line([(x0, y0), (x1, y1)], fill=(grey, grey, grey), width=int(rng.integers(1, 3)))
    stroke = np.asarray(strokes, dtype=np.float32) / 255
    drawn = stroke.sum(-1, keepdims=True) > 0
    return np.clip(np.where(drawn, 0.5 * image + 0.5 * stroke, image), 0.0, 1.0)


def _colour(rng: np.random.Generator) -> np.ndarray:
    """A saturated RGB colour: a random hue at high saturation and a random brightness."""
    hue, value = rng.random(), rng.uniform(0.55, 1.0)
    rgb = np.clip(np.abs((hue * 6 + np.array([0.0, 4.0, 2.0])) % 6 - 3) - 1, 0, 1)
    return (0.15 + 0.85 * rgb) * value


def _side(rng: np.random.Generator, scale: float) -> float:
    band = rng.choice(len(_SIZE_BANDS), p=[b[0] for b in _SIZE_BANDS])
    _, lo, hi = _SIZE_BANDS[band]
    return float(rng.uniform(lo, hi)) * scale


def _visible_boxes(owner: np.ndarray, labels: list[int]) -> list[dict]:
    """Per object, its label and the box ``[x, y, w, h]`` and area of the pixels it owns."""
    objects = []
    for index, label in enumerate(labels):
        ys, xs = np.nonzero(owner == index)
        x0, y0 = int(xs.min()), int(ys.min())
        objects.append({"label": label, "bbox": [x0, y0, int(xs.max()) + 1 - x0, int(ys.max()) + 1 - y0], "area": len(xs)})
    return objects


def render_scene(rng: np.random.Generator, size: tuple[int, int], max_objects: int, kind: SceneKind) -> tuple[np.ndarray, list[dict]]:
    """One image of 1 to ``max_objects`` objects of ``kind`` (fewer where one finds no place to go).

    Returns:
        ``(H, W, 3)`` uint8 image and, per visible object, ``{"label", "bbox": [x, y, w, h], "area"}``
        with ``label`` an index into ``kind.classes`` and the box/area of its visible pixels.
    """
    h, w = size
    scale = min(h, w) / 320
    image = _background(rng, size)
    owner = np.full(size, -1, dtype=np.int32)
    full_areas: list[int] = []
    labels: list[int] = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        label = int(rng.integers(len(kind.classes)))
        side = min(_side(rng, scale * kind.size_factor), 0.9 * min(h, w))
        for _attempt in range(20):
            cx, cy = rng.uniform(side / 2, w - side / 2), rng.uniform(side / 2, h - side / 2)
            mask = kind.draw_mask(rng, label, size, cx, cy, side)
            if not mask.any():
                continue
            covered = np.bincount(owner[mask][owner[mask] >= 0], minlength=len(labels))
            visible = np.bincount(owner[owner >= 0], minlength=len(labels))
            if all(visible[i] - covered[i] >= (1 - MAX_HIDDEN) * full_areas[i] for i in range(len(labels))):
                break
        else:
            continue
        owner[mask] = len(labels)
        full_areas.append(int(mask.sum()))
        labels.append(label)
        image[mask] = _colour(rng)
    return (image * 255).round().astype(np.uint8), _visible_boxes(owner, labels)
