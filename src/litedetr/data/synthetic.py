"""A built-in COCO-format dataset of shapes on textured backgrounds, deterministic from a seed.

Every image holds up to ``max_objects`` objects of :data:`CLASSES`, which differ by shape only: each
object's colour is drawn independently of its class. Object sizes span COCO's small (< 32^2 px),
medium and large (>= 96^2 px) areas: about 36% small, 49% medium and 15% large (at 320x320). Backgrounds are blotchy colour
fields with noise and thin clutter strokes (which are not objects). Objects may overlap: a later
object hides part of an earlier one, never more than :data:`MAX_HIDDEN` of it, and every box and area
is that of the object's visible pixels, as COCO annotates.

On disk (the layout :func:`litedetr.data.coco.find_split` reads)::

    root/annotations/instances_train.json   root/train/000000.jpg ...
    root/annotations/instances_val.json     root/val/000000.jpg ...
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

__all__ = ["CLASSES", "SyntheticSpec", "render_image", "write_synthetic_dataset"]

logger = logging.getLogger(__name__)

CLASSES = ("circle", "square", "triangle", "cross", "star")
"""Category names; their COCO category ids are 1, 2, ... in this order."""

MAX_HIDDEN = 0.4
"""The largest share of an object's pixels that objects drawn over it may hide."""

_SIZE_BANDS = ((0.25, 16, 32), (0.45, 45, 130), (0.3, 150, 240))
"""(probability, min side, max side) in pixels at 320 px images: small, medium and large objects."""


@dataclass(frozen=True)
class SyntheticSpec:
    """What :func:`write_synthetic_dataset` draws.

    Attributes:
        num_train, num_val: images per split.
        image_size: ``(H, W)`` of every image; object sizes scale with ``min(H, W) / 320``.
        max_objects: objects per image are uniform in ``[1, max_objects]``.
        seed: everything follows from it.
    """

    num_train: int = 1000
    num_val: int = 100
    image_size: tuple[int, int] = (320, 320)
    max_objects: int = 20
    seed: int = 0


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


def _shape_mask(kind: str, size: tuple[int, int], cx: float, cy: float, side: float, angle: float) -> np.ndarray:
    """``(H, W)`` bool mask of one shape."""
    canvas = Image.new("L", (size[1], size[0]), 0)
    draw = ImageDraw.Draw(canvas)
    if kind == "circle":
        r = side / 2
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=1)
    else:
        draw.polygon(_polygon(kind, cx, cy, side, angle), fill=1)
    return np.asarray(canvas, dtype=bool)


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


def render_image(rng: np.random.Generator, size: tuple[int, int], max_objects: int) -> tuple[np.ndarray, list[dict]]:
    """One image and its objects.

    Returns:
        ``(H, W, 3)`` uint8 image and, per visible object, ``{"label", "bbox": [x, y, w, h], "area"}``
        with ``label`` an index into :data:`CLASSES` and the box/area of its visible pixels.
    """
    h, w = size
    scale = min(h, w) / 320
    image = _background(rng, size)
    owner = np.full(size, -1, dtype=np.int32)
    full_areas: list[int] = []
    labels: list[int] = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        label = int(rng.integers(len(CLASSES)))
        side = min(_side(rng, scale), 0.9 * min(h, w))
        for _attempt in range(20):
            cx, cy = rng.uniform(side / 2, w - side / 2), rng.uniform(side / 2, h - side / 2)
            mask = _shape_mask(CLASSES[label], size, cx, cy, side, float(rng.uniform(0, 2 * math.pi)))
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
    objects = []
    for index, label in enumerate(labels):
        ys, xs = np.nonzero(owner == index)
        x0, y0 = int(xs.min()), int(ys.min())
        objects.append({"label": label, "bbox": [x0, y0, int(xs.max()) + 1 - x0, int(ys.max()) + 1 - y0], "area": len(xs)})
    return (image * 255).round().astype(np.uint8), objects


def _write_split(root: Path, split: str, count: int, spec: SyntheticSpec, seed: int) -> Path:
    folder = root / split
    folder.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for image_id in tqdm(range(count), desc=f"synthetic {split}", unit="img", leave=False):
        rng = np.random.default_rng([seed, image_id])
        pixels, objects = render_image(rng, spec.image_size, spec.max_objects)
        name = f"{image_id:06d}.jpg"
        Image.fromarray(pixels).save(folder / name, quality=95)
        images.append({"id": image_id, "file_name": name, "height": spec.image_size[0], "width": spec.image_size[1]})
        for obj in objects:
            annotations.append(
                {"id": len(annotations) + 1, "image_id": image_id, "category_id": obj["label"] + 1, "bbox": obj["bbox"], "area": obj["area"], "iscrowd": 0}
            )
    categories = [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(CLASSES)]
    annotation_file = root / "annotations" / f"instances_{split}.json"
    annotation_file.parent.mkdir(parents=True, exist_ok=True)
    annotation_file.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    logger.info("wrote %d %s images with %d objects under %s", count, split, len(annotations), folder)
    return annotation_file


def write_synthetic_dataset(root: str | Path, spec: SyntheticSpec = SyntheticSpec()) -> Path:
    """Write the dataset under ``root`` (skipped when the same spec is already there); returns ``root``.

    The two splits use different seeds, so no validation image repeats a training image.
    """
    root = Path(root)
    stamp = root / "spec.json"
    wanted = json.dumps(spec.__dict__, default=list, sort_keys=True)
    if stamp.exists() and stamp.read_text() == wanted:
        logger.info("synthetic dataset already at %s", root)
        return root
    _write_split(root, "train", spec.num_train, spec, seed=2 * spec.seed)
    _write_split(root, "val", spec.num_val, spec, seed=2 * spec.seed + 1)
    stamp.write_text(wanted)
    return root
