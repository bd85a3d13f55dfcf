"""DETR's augmentations on v2 box types: boxes follow the pixels, and they are reproducible."""

from __future__ import annotations

import torch
from torchvision import tv_tensors

from litedetr.data import AugmentConfig, train_transform
from litedetr.data.transforms import RandomSizeCrop


def sample() -> tuple[torch.Tensor, dict]:
    image = torch.zeros(3, 100, 200, dtype=torch.uint8)
    image[:, 20:40, 30:70] = 255  # one white box
    boxes = tv_tensors.BoundingBoxes([[30.0, 20.0, 70.0, 40.0]], format="XYXY", canvas_size=(100, 200))
    return image, {"boxes": boxes, "labels": torch.tensor([1])}


def white_box(image: torch.Tensor) -> list[float]:
    ys, xs = torch.nonzero(image[0] > 127, as_tuple=True)
    return [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]


def test_flip_moves_boxes_with_pixels():
    transform = train_transform(AugmentConfig(flip_prob=1.0, crop_prob=0.0))
    image, target = transform(*sample())
    assert target["boxes"].tolist() == [[130.0, 20.0, 170.0, 40.0]] == [white_box(image)]


def test_crop_branch_keeps_boxes_on_their_pixels_and_drops_cropped_out_ones():
    transform = train_transform(AugmentConfig(flip_prob=0.0, crop_prob=1.0, crop_resize=(100,), crop_size=(40, 80)))
    kept = dropped = 0
    for seed in range(40):
        torch.manual_seed(seed)
        image, target = transform(*sample())
        assert image.shape[1] <= 80 and image.shape[2] <= 80 and min(image.shape[1:]) >= 40
        if len(target["boxes"]):
            kept += 1
            box = target["boxes"][0].tolist()
            assert all(abs(a - b) <= 1.0 for a, b in zip(box, white_box(image)))
            assert target["labels"].tolist() == [1]
        else:
            dropped += 1
            assert target["labels"].numel() == 0
    assert kept and dropped


def test_random_size_crop_respects_its_bounds_and_the_image():
    crop = RandomSizeCrop(30, 60)
    for seed in range(20):
        torch.manual_seed(seed)
        params = crop.make_params([torch.zeros(3, 50, 200)])
        assert 30 <= params["height"] <= 50 and 30 <= params["width"] <= 60
        assert 0 <= params["top"] <= 50 - params["height"] and 0 <= params["left"] <= 200 - params["width"]


def test_scaled_recipe_shrinks_crop_sizes():
    assert AugmentConfig().scaled(0.4) == AugmentConfig(crop_resize=(160, 200, 240), crop_size=(154, 240))
