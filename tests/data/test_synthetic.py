"""The built-in synthetic dataset: deterministic, COCO-valid, and as varied as promised."""

from __future__ import annotations

import json

import numpy as np
import pytest

from litedetr.data import CLASSES, CocoDetection, SyntheticSpec, find_split, write_synthetic_dataset
from litedetr.data.synthetic import MAX_HIDDEN, render_image


def test_same_seed_same_images_other_seed_other_images():
    a = render_image(np.random.default_rng([0, 3]), (160, 160), 20)
    b = render_image(np.random.default_rng([0, 3]), (160, 160), 20)
    c = render_image(np.random.default_rng([1, 3]), (160, 160), 20)
    assert np.array_equal(a[0], b[0]) and a[1] == b[1]
    assert not np.array_equal(a[0], c[0])


def test_object_statistics_over_many_images():
    objects, counts = [], []
    for i in range(150):
        _, found = render_image(np.random.default_rng([0, i]), (320, 320), 20)
        objects += found
        counts.append(len(found))
    areas = np.array([o["area"] for o in objects])
    small, large = (areas < 32**2).mean(), (areas >= 96**2).mean()
    assert small >= 0.30 and large >= 0.10 and 1 - small - large >= 0.30  # COCO's small / medium / large
    assert {o["label"] for o in objects} == set(range(len(CLASSES))) and len(CLASSES) >= 5
    assert max(counts) >= 15 and min(counts) >= 1


def test_boxes_are_the_visible_pixels_and_occlusion_is_bounded():
    rng = np.random.default_rng([0, 7])
    image, objects = render_image(rng, (320, 320), 20)
    assert image.shape == (320, 320, 3) and image.dtype == np.uint8
    for obj in objects:
        x, y, w, h = obj["bbox"]
        assert 0 <= x and 0 <= y and x + w <= 320 and y + h <= 320 and w > 0 and h > 0
        assert 0 < obj["area"] <= w * h


def test_some_objects_are_partly_hidden():
    hidden = 0
    for i in range(40):
        _, objects = render_image(np.random.default_rng([0, i]), (320, 320), 20)
        boxes = np.array([o["bbox"] for o in objects], dtype=float)
        x0, y0, x1, y1 = boxes[:, 0], boxes[:, 1], boxes[:, 0] + boxes[:, 2], boxes[:, 1] + boxes[:, 3]
        overlap_w = np.minimum(x1[:, None], x1[None]) - np.maximum(x0[:, None], x0[None])
        overlap_h = np.minimum(y1[:, None], y1[None]) - np.maximum(y0[:, None], y0[None])
        overlapping = (overlap_w > 0) & (overlap_h > 0)
        hidden += int(overlapping.sum() - len(objects)) // 2
    assert hidden > 0 and 0 < MAX_HIDDEN < 1


def test_written_dataset_loads_as_coco_and_is_reused(tmp_path, caplog):
    spec = SyntheticSpec(num_train=6, num_val=3, image_size=(96, 128), max_objects=5, seed=3)
    root = write_synthetic_dataset(tmp_path, spec)
    train, val = find_split(root, "train"), find_split(root, "val")
    data = json.loads(train.annotations.read_text())
    assert [c["name"] for c in data["categories"]] == list(CLASSES)
    assert len(data["images"]) == 6 and all((im["height"], im["width"]) == (96, 128) for im in data["images"])
    dataset = CocoDetection(train.annotations, train.images)
    image, target = dataset[0]
    assert image.shape == (3, 96, 128) and len(target["labels"]) > 0
    assert len(CocoDetection(val.annotations, val.images)) == 3
    stamp = train.annotations.stat().st_mtime_ns
    write_synthetic_dataset(tmp_path, spec)
    assert train.annotations.stat().st_mtime_ns == stamp, "an existing dataset with the same spec is reused"


@pytest.mark.parametrize("size", [(64, 64), (240, 320)])
def test_any_image_size_works(size):
    image, objects = render_image(np.random.default_rng(0), size, 10)
    assert image.shape == (*size, 3) and objects
