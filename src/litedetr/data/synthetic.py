"""The built-in COCO-format datasets: objects on textured backgrounds, deterministic from a seed.

Two kinds (:data:`KINDS`), which share backgrounds, sizes, colours and occlusion
(:mod:`litedetr.data.scene`) and no class:

- ``shapes`` (the default): :data:`CLASSES`, five shapes that differ by outline only
  (:mod:`litedetr.data.shapes`). About 36% of objects are COCO-small, 49% medium and 15% large (at 320x320).
- ``glyphs``: :data:`~litedetr.data.glyphs.GLYPH_CLASSES`, five digits and five letters drawn as
  strokes without a font (:mod:`litedetr.data.glyphs`). About 35% of objects are COCO-small, 51%
  medium and 14% large (at 320x320; areas count stroke pixels, so glyphs are drawn 1.4x taller).

Every image holds 1 to ``max_objects`` objects. A later object hides part of an earlier one, never
more than :data:`MAX_HIDDEN` of it, and every box and area is that of the object's visible pixels.

On disk (the layout :func:`litedetr.data.coco.find_split` reads)::

    root/annotations/instances_train.json   root/train/000000.jpg ...
    root/annotations/instances_val.json     root/val/000000.jpg ...
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from litedetr.data.glyphs import GLYPH_CLASSES, GLYPHS
from litedetr.data.scene import MAX_HIDDEN, SceneKind, render_scene
from litedetr.data.shapes import CLASSES, SHAPES

__all__ = ["CLASSES", "GLYPH_CLASSES", "KINDS", "MAX_HIDDEN", "SyntheticSpec", "render_image", "write_synthetic_dataset"]

logger = logging.getLogger(__name__)

KINDS: dict[str, SceneKind] = {"shapes": SHAPES, "glyphs": GLYPHS}
"""The built-in datasets by name; ``KINDS[name].classes`` are its category names (ids 1, 2, ...)."""


@dataclass(frozen=True)
class SyntheticSpec:
    """What :func:`write_synthetic_dataset` draws.

    Attributes:
        num_train, num_val: images per split.
        image_size: ``(H, W)`` of every image; object sizes scale with ``min(H, W) / 320``.
        max_objects: objects per image are uniform in ``[1, max_objects]``.
        seed: everything follows from it.
        kind: which objects, a key of :data:`KINDS`.
    """

    num_train: int = 1000
    num_val: int = 100
    image_size: tuple[int, int] = (320, 320)
    max_objects: int = 20
    seed: int = 0
    kind: str = "shapes"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown synthetic dataset {self.kind!r}; choose one of {sorted(KINDS)}")

    def stamp(self) -> str:
        """The JSON that marks a written dataset; a ``shapes`` one leaves ``kind`` out, as before kinds existed."""
        fields = dataclasses.asdict(self)
        if self.kind == "shapes":
            del fields["kind"]
        return json.dumps(fields, default=list, sort_keys=True)


def render_image(rng: np.random.Generator, size: tuple[int, int], max_objects: int, kind: str = "shapes") -> tuple[np.ndarray, list[dict]]:
    """One image of the ``kind`` dataset and its objects.

    Returns:
        ``(H, W, 3)`` uint8 image and, per visible object, ``{"label", "bbox": [x, y, w, h], "area"}``
        with ``label`` an index into ``KINDS[kind].classes`` and the box/area of its visible pixels.
    """
    return render_scene(rng, size, max_objects, KINDS[kind])


def _write_split(root: Path, split: str, count: int, spec: SyntheticSpec, seed: int) -> Path:
    folder = root / split
    folder.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for image_id in tqdm(range(count), desc=f"synthetic {split}", unit="img", leave=False):
        rng = np.random.default_rng([seed, image_id])
        pixels, objects = render_image(rng, spec.image_size, spec.max_objects, spec.kind)
        name = f"{image_id:06d}.jpg"
        Image.fromarray(pixels).save(folder / name, quality=95)
        images.append({"id": image_id, "file_name": name, "height": spec.image_size[0], "width": spec.image_size[1]})
        for obj in objects:
            annotations.append(
                {"id": len(annotations) + 1, "image_id": image_id, "category_id": obj["label"] + 1, "bbox": obj["bbox"], "area": obj["area"], "iscrowd": 0}
            )
    kind = KINDS[spec.kind]
    categories = [{"id": i + 1, "name": name, "supercategory": kind.supercategory} for i, name in enumerate(kind.classes)]
    annotation_file = root / "annotations" / f"instances_{split}.json"
    annotation_file.parent.mkdir(parents=True, exist_ok=True)
    annotation_file.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    logger.info("wrote %d %s images with %d objects under %s", count, split, len(annotations), folder)
    return annotation_file


def write_synthetic_dataset(root: str | Path, spec: SyntheticSpec = SyntheticSpec()) -> Path:
    """Write the ``spec.kind`` dataset under ``root`` (skipped when the same spec is already there); returns ``root``.

    The two splits use different seeds, so no validation image repeats a training image.
    """
    root = Path(root)
    stamp = root / "spec.json"
    wanted = spec.stamp()
    if stamp.exists() and stamp.read_text() == wanted:
        logger.info("synthetic %s dataset already at %s", spec.kind, root)
        return root
    _write_split(root, "train", spec.num_train, spec, seed=2 * spec.seed)
    _write_split(root, "val", spec.num_val, spec, seed=2 * spec.seed + 1)
    stamp.write_text(wanted)
    return root
