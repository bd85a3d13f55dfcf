"""The built-in synthetic datasets: deterministic, COCO-valid, and as varied as promised."""

from __future__ import annotations

import dataclasses
import itertools
import json

import numpy as np
import pytest

from litedetr.data import CLASSES, GLYPH_CLASSES, KINDS, CocoDetection, SyntheticSpec, find_split, write_synthetic_dataset
from litedetr.data.scene import render_scene
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


def _replayed_owner(kind: str, seed: int, size: tuple[int, int]) -> tuple[np.ndarray, list[dict], np.ndarray]:
    """The image and objects of a scene, and its owner map rebuilt from every mask the scene drew.

    An object's placement attempts share its label and size; the last attempt is the accepted one
    when it passes the occlusion rule (else all 20 failed and the object was dropped).
    """
    calls = []

    def recording(rng, label, size, cx, cy, side):
        mask = KINDS[kind].draw_mask(rng, label, size, cx, cy, side)
        calls.append((label, side, mask))
        return mask

    recorded = dataclasses.replace(KINDS[kind], draw_mask=recording)
    image, objects = render_scene(np.random.default_rng(seed), size, 20, recorded)
    owner, full = np.full(size, -1), []
    for _, attempts in itertools.groupby(calls, key=lambda call: call[:2]):
        mask = list(attempts)[-1][2]
        others = [(owner == i).sum() - (owner[mask] == i).sum() for i in range(len(full))]
        if mask.any() and all(left >= (1 - MAX_HIDDEN) * area for left, area in zip(others, full)):
            owner[mask] = len(full)
            full.append(int(mask.sum()))
    return image, objects, owner


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_boxes_and_areas_are_those_of_the_visible_pixels(kind):
    for seed in range(3):
        image, objects, owner = _replayed_owner(kind, seed, (320, 320))
        assert len(objects) == owner.max() + 1 >= 1
        for index, obj in enumerate(objects):
            ys, xs = np.nonzero(owner == index)
            x, y, w, h = obj["bbox"]
            assert (x, y, x + w, y + h) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            assert obj["area"] == len(xs)
            assert len(np.unique(image[ys, xs], axis=0)) == 1, "an object's visible pixels are its one colour"


def test_glyph_objects_per_image_sizes_and_classes():
    counts, areas, labels = [], [], []
    for i in range(120):
        _, objects = render_image(np.random.default_rng([0, i]), (320, 320), 20, "glyphs")
        counts.append(len(objects))
        areas += [o["area"] for o in objects]
        labels += [o["label"] for o in objects]
    assert 1 <= min(counts) and max(counts) <= 20 and max(counts) >= 15 and 6 <= np.mean(counts) <= 12
    areas = np.array(areas)
    small, large = (areas < 32**2).mean(), (areas >= 96**2).mean()
    assert small >= 0.3 and large >= 0.1 and 1 - small - large >= 0.4
    assert sorted(set(labels)) == list(range(len(GLYPH_CLASSES))) == list(range(10))
    assert all(1 <= len(render_image(np.random.default_rng(i), (160, 160), 3, "glyphs")[1]) <= 3 for i in range(20))


def test_glyph_classes_are_new_digits_and_letters():
    assert not set(GLYPH_CLASSES) & set(CLASSES)
    assert GLYPH_CLASSES[0] == "digit 2" and GLYPH_CLASSES[-1] == "letter R"
    assert all(name.split()[0] in {"digit", "letter"} and len(name.split()[1]) == 1 for name in GLYPH_CLASSES)


def _file_bytes(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_glyph_dataset_is_deterministic_coco_and_not_the_shapes_one(tmp_path):
    spec = SyntheticSpec(num_train=4, num_val=2, image_size=(80, 96), max_objects=6, seed=5, kind="glyphs")
    first, second = write_synthetic_dataset(tmp_path / "a", spec), write_synthetic_dataset(tmp_path / "b", spec)
    assert _file_bytes(first) == _file_bytes(second)
    data = json.loads(find_split(first, "train").annotations.read_text())
    assert [(c["id"], c["name"], c["supercategory"]) for c in data["categories"]] == [(i + 1, n, "glyph") for i, n in enumerate(GLYPH_CLASSES)]
    assert {a["category_id"] for a in data["annotations"]} <= set(range(1, 11)) and data["annotations"]
    image, target = CocoDetection(find_split(first, "train").annotations, find_split(first, "train").images)[0]
    assert image.shape == (3, 80, 96) and len(target["labels"]) > 0
    other_seed = write_synthetic_dataset(tmp_path / "c", dataclasses.replace(spec, seed=6))
    assert _file_bytes(other_seed)["train/000000.jpg"] != _file_bytes(first)["train/000000.jpg"]

    write_synthetic_dataset(tmp_path / "a", dataclasses.replace(spec, kind="shapes"))
    names = [c["name"] for c in json.loads(find_split(first, "train").annotations.read_text())["categories"]]
    assert names == list(CLASSES), "a shapes spec rewrites a folder that holds glyphs"


def test_the_shapes_stamp_is_the_one_written_before_kinds_existed():
    assert json.loads(SyntheticSpec().stamp()) == {"image_size": [320, 320], "max_objects": 20, "num_train": 1000, "num_val": 100, "seed": 0}
    assert json.loads(SyntheticSpec(kind="glyphs").stamp())["kind"] == "glyphs"
    with pytest.raises(ValueError, match=r"unknown synthetic dataset 'digits'; choose one of \['glyphs', 'shapes'\]"):
        SyntheticSpec(kind="digits")
