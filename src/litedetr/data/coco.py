"""COCO-format detection datasets: an images folder and an ``instances`` JSON.

Category ids can be any integers: they map to contiguous labels ``0..K-1`` in id order, and back for
results. Crowd boxes are kept out of the training targets (COCO evaluation reads them from the JSON).
Images without objects are kept. Problems in the data are named and handled, never silently:

- an annotation whose category id is not among the categories stops loading (the file is broken);
- a box of zero or negative size is skipped; a box reaching outside its image is clipped to it
  (and skipped if nothing is left); both are counted and logged with example annotation ids;
- a missing image file is skipped at load time, an unreadable one when it is read (both logged);
- a dataset left without images is an error.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import tv_tensors

from litedetr.models.inputs import load_image

__all__ = ["CocoDetection", "Sample", "Split", "find_split", "collate"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Split:
    """Where one split of a dataset lives: its annotation JSON and its images folder."""

    annotations: Path
    images: Path


def find_split(root: str | Path, split: str) -> Split:
    """The ``split`` (``train`` or ``val``) of a dataset folder laid out as COCO's.

    ``root/annotations/instances_<split>[suffix].json`` with images in ``root/<split>[suffix]/``,
    e.g. ``instances_val2017.json`` and ``val2017/``.
    """
    root = Path(root)
    found = sorted((root / "annotations").glob(f"instances_{split}*.json"))
    if not found:
        raise ValueError(f"{root}: no annotations/instances_{split}*.json (expected COCO's layout)")
    if len(found) > 1:
        raise ValueError(f"{root}: several {split} annotation files, pass one explicitly: {[f.name for f in found]}")
    images = root / found[0].stem.removeprefix("instances_")
    if not images.is_dir():
        raise ValueError(f"{root}: images folder {images.name}/ for {found[0].name} does not exist")
    return Split(found[0], images)


@dataclass
class Sample:
    """One image's training targets: ``boxes (N, 4)`` absolute ``xyxy`` and ``labels (N,)``."""

    image_id: int
    path: Path
    height: int
    width: int
    boxes: Tensor = field(repr=False)
    labels: Tensor = field(repr=False)


@dataclass
class _Problems:
    """Annotation ids of each kind of repaired or dropped box."""

    degenerate: list[int] = field(default_factory=list)
    clipped: list[int] = field(default_factory=list)
    unknown_image: list[int] = field(default_factory=list)

    def log(self, source: Path) -> None:
        for ids, what in (
            (self.degenerate, "skipped boxes of zero or negative size"),
            (self.clipped, "clipped boxes reaching outside their image"),
            (self.unknown_image, "skipped annotations of image ids not in 'images'"),
        ):
            if ids:
                logger.warning("%s: %s %d (annotation ids %s%s)", source.name, what, len(ids), ids[:5], ", ..." if len(ids) > 5 else "")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: annotation file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    missing = [key for key in ("images", "annotations", "categories") if not isinstance(data.get(key), list)]
    if missing:
        raise ValueError(f"{path}: not a COCO instances file, missing list(s) {missing}")
    if not data["categories"]:
        raise ValueError(f"{path}: no categories")
    return data


class CocoDetection(Dataset):
    """A COCO-format dataset.

    ``dataset[i]`` is ``(image, target)``: a ``(3, H, W)`` float image in [0, 1] and a dict with
    ``boxes (N, 4)`` absolute ``xyxy``, ``labels (N,)`` in ``[0, K)`` and ``image_id``; or ``None``
    when the image file cannot be decoded (:func:`collate` drops it).

    Args:
        annotations: the instances JSON.
        images: the folder its ``file_name`` entries are relative to.
        transform: called as ``transform(image, target)`` with a ``uint8`` image and
            :class:`~torchvision.tv_tensors.BoundingBoxes`; returns the pair.
        seed: augmentation randomness is drawn from ``(seed, epoch, index)``, so it does not depend
            on the data-loader workers and a resumed run sees the same augmentations.
    """

    def __init__(self, annotations: str | Path, images: str | Path, transform: Callable | None = None, seed: int = 0):
        self.annotations, self.images = Path(annotations), Path(images)
        self.transform, self.seed, self.epoch = transform, seed, 0
        data = _read_json(self.annotations)
        self.categories = sorted(data["categories"], key=lambda c: c["id"])
        self.category_ids: tuple[int, ...] = tuple(c["id"] for c in self.categories)
        self.class_names: tuple[str, ...] = tuple(str(c.get("name", c["id"])) for c in self.categories)
        self.samples = self._samples(data)

    @property
    def num_classes(self) -> int:
        return len(self.category_ids)

    def _samples(self, data: dict[str, Any]) -> list[Sample]:
        label_of = {cid: i for i, cid in enumerate(self.category_ids)}
        images = {img["id"]: img for img in data["images"]}
        boxes: dict[int, list[list[float]]] = {i: [] for i in images}
        labels: dict[int, list[int]] = {i: [] for i in images}
        problems = _Problems()
        for ann in data["annotations"]:
            if ann["category_id"] not in label_of:
                raise ValueError(
                    f"{self.annotations}: annotation {ann['id']} (image {ann['image_id']}) has category_id {ann['category_id']}, "
                    f"which is not among the categories {list(self.category_ids)}"
                )
            if ann.get("iscrowd", 0):
                continue
            image = images.get(ann["image_id"])
            if image is None:
                problems.unknown_image.append(ann["id"])
                continue
            x, y, w, h = (float(v) for v in ann["bbox"])
            if w <= 0 or h <= 0:
                problems.degenerate.append(ann["id"])
                continue
            x0, y0 = max(x, 0.0), max(y, 0.0)
            x1, y1 = min(x + w, float(image["width"])), min(y + h, float(image["height"]))
            if (x0, y0, x1, y1) != (x, y, x + w, y + h):
                problems.clipped.append(ann["id"])
                if x1 <= x0 or y1 <= y0:
                    problems.degenerate.append(ann["id"])
                    continue
            boxes[image["id"]].append([x0, y0, x1, y1])
            labels[image["id"]].append(label_of[ann["category_id"]])
        problems.log(self.annotations)

        samples, missing = [], []
        for image_id, image in images.items():
            path = self.images / image["file_name"]
            if not path.is_file():
                missing.append(image["file_name"])
                continue
            box = torch.tensor(boxes[image_id], dtype=torch.float32).reshape(-1, 4)
            samples.append(Sample(image_id, path, image["height"], image["width"], box, torch.tensor(labels[image_id], dtype=torch.long)))
        if missing:
            logger.warning("%s: skipped %d images whose files are missing from %s (e.g. %s)", self.annotations.name, len(missing), self.images, missing[:3])
        if not samples:
            raise ValueError(f"{self.annotations}: no usable images (the file lists {len(images)}, found in {self.images}: 0)")
        return samples

    def set_epoch(self, epoch: int) -> None:
        """Draw the next epoch's augmentations (call before iterating)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def read_image(self, index: int) -> Tensor | None:
        """``(3, H, W)`` uint8 RGB as :func:`~litedetr.models.inputs.load_image` reads it (EXIF orientation
        applied, 16-bit scaled), or ``None`` (logged) when the file cannot be read or its size is not the JSON's."""
        sample = self.samples[index]
        try:
            pixels = np.asarray(load_image(sample.path))
        except ValueError as err:
            logger.warning("skipped unreadable image %s", str(err).splitlines()[0])
            return None
        image = torch.from_numpy(pixels.copy()).permute(2, 0, 1)
        if tuple(image.shape[1:]) != (sample.height, sample.width):
            logger.warning("skipped %s: its size %s differs from the annotation's %s", sample.path, tuple(image.shape[1:]), (sample.height, sample.width))
            return None
        return image

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Any]] | None:
        sample = self.samples[index]
        image = self.read_image(index)
        if image is None:
            return None
        target: dict[str, Any] = {
            "boxes": tv_tensors.BoundingBoxes(sample.boxes.clone(), format="XYXY", canvas_size=(sample.height, sample.width)),
            "labels": sample.labels.clone(),
            "image_id": sample.image_id,
        }
        if self.transform is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(hash((self.seed, self.epoch, index)) & 0x7FFF_FFFF_FFFF_FFFF)
                image, target = self.transform(image, target)
        target["boxes"] = target["boxes"].as_subclass(Tensor)
        return image.float() / 255, target

    def label_to_category(self, labels: Tensor) -> list[int]:
        """Contiguous labels back to the JSON's category ids."""
        return [self.category_ids[int(label)] for label in labels]


def collate(batch: list[tuple[Tensor, dict[str, Any]] | None]) -> tuple[list[Tensor], list[dict[str, Any]]]:
    """A list of samples -> ``(images, targets)`` lists, without the unreadable ones (``None``)."""
    kept = [item for item in batch if item is not None]
    return [image for image, _ in kept], [target for _, target in kept]
