"""Shared test helpers: the authors' reference tensors in ../shared/fixtures (skipped when absent) and
small COCO-format datasets written on the fly."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

# OpenMP threads that wait for each other spin for a long time (libgomp's default), which is harmless
# on an idle machine and ruinous on a busy one: with another CPU-heavy process beside the suite, a
# small model's training step took 2-6x longer with torch's 2 threads than with 1. A short spin keeps
# the idle speed (within a few percent) and lets waiting threads yield under load. libgomp reads it
# when torch loads it, so it is set before torch is imported; subprocesses of the tests inherit it.
assert "torch" not in sys.modules, "tests/conftest.py must run before torch is imported (GOMP_SPINCOUNT)"
os.environ.setdefault("GOMP_SPINCOUNT", "1000")

import numpy as np
import pytest
import torch
import torchvision.ops
from PIL import Image

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"


def load_fixture(name: str) -> dict:
    path = FIXTURES / name
    if not path.exists():
        pytest.skip(f"reference fixture {path} is not present")
    return torch.load(path, weights_only=True)


@pytest.fixture(autouse=True)
def _deterministic_seed():
    torch.manual_seed(0)


@contextlib.contextmanager
def benchmark_script(name: str) -> Iterator[ModuleType]:
    """``benchmarks/<name>.py`` imported as module ``name`` (registered in ``sys.modules`` while in use, as
    dataclasses resolve annotations through it)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[name]


def official_keys(layout: str) -> dict[str, list[int]]:
    """Every key and shape of a released R50 checkpoint of ``layout`` (``../shared/fixtures``; skipped when absent)."""
    path = FIXTURES / f"official_{layout.replace('-', '_')}_r50_state_dict_keys.json"
    if not path.exists():
        pytest.skip(f"{path} is not present")
    return json.loads(path.read_text())


def random_checkpoint(layout: str, generator: torch.Generator) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Random, unshared values for every key of a released checkpoint (keys saved twice share a value),
    and the same values under our names."""
    from litedetr.weights.keys import official_rules, rename_official

    rules = official_rules(layout)
    state, ours = {}, {}
    for key, shape in official_keys(layout).items():
        (target,) = rename_official({key: torch.zeros(shape)}, rules)
        state[key] = ours.setdefault(target, torch.randn(shape, generator=generator))
    return state, ours


def write_coco(root: Path, images: list[dict], annotations: list[dict], categories: list[dict]) -> tuple[Path, Path]:
    """Write ``images`` (dicts with ``id``, ``file_name``, ``height``, ``width``) as random PNGs and the JSON.

    Returns the annotation file and the images folder.
    """
    folder = root / "images"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for image in images:
        pixels = (rng.random((image["height"], image["width"], 3)) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / image["file_name"])
    annotation_file = root / "instances.json"
    annotation_file.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return annotation_file, folder


def coco_image(image_id: int, height: int = 40, width: int = 50) -> dict:
    return {"id": image_id, "file_name": f"{image_id:03d}.png", "height": height, "width": width}


def coco_box(ann_id: int, image_id: int, category_id: int, bbox: list[float], iscrowd: int = 0) -> dict:
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": bbox, "area": bbox[2] * bbox[3], "iscrowd": iscrowd}


@pytest.fixture(scope="session")
def tiny_synthetic(tmp_path_factory) -> Path:
    """A synthetic dataset of 64x64 images (4 train, 2 val, up to 3 objects each)."""
    from litedetr.data import SyntheticSpec, write_synthetic_dataset

    return write_synthetic_dataset(tmp_path_factory.mktemp("synthetic"), SyntheticSpec(num_train=4, num_val=2, image_size=(64, 64), max_objects=3))


def fast_nms_reference(scores: torch.Tensor, boxes: torch.Tensor, k: int, threshold: float, candidates: int) -> list[int]:
    """One image, loop by loop: a candidate is suppressed when any higher-scoring candidate overlaps it."""
    order = sorted(range(len(scores)), key=lambda i: -float(scores[i]))[:candidates]
    iou = torchvision.ops.box_iou(boxes, boxes)
    suppressed = [any(iou[order[i], order[j]] > threshold for i in range(j)) for j in range(len(order))]
    kept = [index for index, off in zip(order, suppressed) if not off]
    return (kept + [index for index, off in zip(order, suppressed) if off])[:k]
