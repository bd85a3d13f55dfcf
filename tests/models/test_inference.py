"""load_model, load_checkpoint and Detector.predict: every input type gives the same detections as the tensor API."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import FIXTURES
from PIL import Image

from litedetr import build_model
from litedetr.models import Detector
from litedetr.models.inputs import to_image_tensor
from litedetr.weights import ConversionError, load_checkpoint, load_model, save_model
from litedetr.weights.keys import official_rules, rename_official

NAMES = ("cat", "dog", "bird")


@pytest.fixture(scope="module")
def model() -> Detector:
    torch.manual_seed(0)
    return build_model("lite-dino-r18-tiny-h3l1-2x3", num_classes=3, class_names=NAMES, min_size=(96,), max_size=128, num_queries=20, num_select=10).eval()


@pytest.fixture(scope="module")
def picture() -> np.ndarray:
    """An ``(H, W, 3)`` uint8 RGB image: gradient, a rectangle and a disc."""
    h, w = 90, 120
    yy, xx = np.mgrid[0:h, 0:w]
    image = np.stack([xx * 2, yy * 2, (xx + yy) % 256], -1).astype(np.uint8)
    image[20:60, 10:50] = (230, 40, 40)
    image[(yy - 45) ** 2 + (xx - 90) ** 2 < 15**2] = (30, 30, 220)
    return image


@pytest.fixture(scope="module")
def expected(model, picture) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return model([torch.from_numpy(picture).permute(2, 0, 1).float() / 255])[0]


def assert_same(result: dict, expected: dict[str, torch.Tensor], threshold: float = 0.0) -> None:
    keep = expected["scores"] >= threshold
    torch.testing.assert_close(result["scores"], expected["scores"][keep])
    assert torch.equal(result["labels"], expected["labels"][keep])
    torch.testing.assert_close(result["boxes"], expected["boxes"][keep].clamp(min=0).clamp(max=torch.tensor([120, 90, 120, 90])))
    assert result["names"] == [NAMES[i] for i in result["labels"].tolist()]


def test_numpy_array(model, picture, expected):
    assert_same(model.predict(picture, threshold=0.0)[0], expected)


def test_pil_image(model, picture, expected):
    assert_same(model.predict(Image.fromarray(picture), threshold=0.0)[0], expected)


def test_a_pil_image_and_its_file_give_the_same_detections(model, picture, tmp_path):
    """EXIF orientation and 16-bit grayscale: one rule for paths and PIL images (issue 25 item 7)."""
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    Image.fromarray(picture).save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    gray = (np.linspace(0, 65535, 90 * 120).reshape(90, 120)).astype(np.uint16)
    Image.fromarray(gray).save(tmp_path / "gray16.png")
    for name in ("rotated.jpg", "gray16.png"):
        with Image.open(tmp_path / name) as opened:
            opened.load()
            from_pil = model.predict(opened, threshold=0.0)[0]
        from_path = model.predict(tmp_path / name, threshold=0.0)[0]
        torch.testing.assert_close(from_pil["boxes"], from_path["boxes"])
        torch.testing.assert_close(from_pil["scores"], from_path["scores"])
    with Image.open(tmp_path / "rotated.jpg") as opened:
        assert model.predict(opened, threshold=0.0)[0]["boxes"][:, 2].max() <= 90  # the displayed frame is 90 wide
    with Image.open(tmp_path / "gray16.png") as opened:
        assert np.array(opened).max() > 255 and to_image_tensor(opened).std() > 0.1  # not clipped to white


def test_file_paths_str_and_path(model, picture, expected, tmp_path):
    path = tmp_path / "scene.png"
    Image.fromarray(picture).save(path)
    results = model.predict([str(path), path], threshold=0.0)
    for result in results:
        assert_same(result, expected)


def test_float_tensor_uint8_tensor_and_batch_tensor(model, picture, expected):
    as_uint8 = torch.from_numpy(picture).permute(2, 0, 1)
    as_float = as_uint8.float() / 255
    assert_same(model.predict(as_uint8, threshold=0.0)[0], expected)
    assert_same(model.predict(as_float, threshold=0.0)[0], expected)
    results = model.predict(torch.stack([as_float, as_float]), threshold=0.0)
    assert len(results) == 2
    assert_same(results[1], expected)


def test_mixed_list_in_small_batches_keeps_order(model, picture, expected):
    other = np.ascontiguousarray(picture[::-1])
    results = model.predict([picture, other, Image.fromarray(picture), other, picture], threshold=0.0, batch_size=2)
    assert len(results) == 5
    for i in (0, 2, 4):
        assert_same(results[i], expected)
    torch.testing.assert_close(results[1]["scores"], results[3]["scores"])


def test_threshold_filters_and_boxes_lie_in_the_image(model, picture, expected):
    cut = float(expected["scores"][4])
    result = model.predict(picture, threshold=cut)[0]
    assert_same(result, expected, threshold=cut)
    assert len(result["scores"]) >= 5 and bool((result["scores"] >= cut).all())
    assert bool((result["boxes"] >= 0).all()) and bool((result["boxes"][:, 0::2] <= 120).all()) and bool((result["boxes"][:, 1::2] <= 90).all())


def test_predict_restores_training_mode(model, picture):
    model.train()
    try:
        model.predict(picture)
        assert model.training
    finally:
        model.eval()


def test_no_class_names_gives_label_numbers(picture):
    model = build_model("dino-r18-tiny", num_classes=2, min_size=(96,), max_size=128, num_queries=20, num_select=5)
    result = model.predict(picture, threshold=0.0)[0]
    assert result["names"] == [str(i) for i in result["labels"].tolist()]


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.zeros((10, 10), dtype=np.uint8), r"\(H, W, 3\) uint8"),
        (np.zeros((10, 10, 3), dtype=np.float32), r"\(H, W, 3\) uint8"),
        (torch.full((3, 8, 8), 255.0), r"must lie in \[0, 1\]"),
        (torch.zeros(8, 8, 3), r"must be \(3, H, W\)"),
        (42, "unsupported image type int"),
        ([], "no images given"),
    ],
)
def test_bad_inputs_are_clear_errors(model, bad, message):
    with pytest.raises(ValueError, match=message):
        model.predict(bad)


def test_corrupt_and_missing_files_are_named(model, tmp_path):
    corrupt = tmp_path / "broken.jpg"
    corrupt.write_bytes(b"\xff\xd8 this is not a jpeg")
    with pytest.raises(ValueError, match="broken.jpg: not a readable image"):
        model.predict(corrupt)
    with pytest.raises(ValueError, match="nowhere.png: no such image file"):
        model.predict(tmp_path / "nowhere.png")


def test_load_safetensors(model, picture, expected, tmp_path):
    path = save_model(model, tmp_path / "model.safetensors")
    loaded = load_model(path)
    assert not loaded.training and loaded.config == model.config
    assert_same(loaded.predict(picture, threshold=0.0)[0], expected)


def test_load_errors(tmp_path):
    with pytest.raises(ValueError, match="missing.safetensors: no such checkpoint file"):
        load_model(tmp_path / "missing.safetensors")
    pth = tmp_path / "authors.pth"
    torch.save({"model": {"transformer.level_embed": torch.zeros(4, 256)}}, pth)
    with pytest.raises(ValueError, match="pass its preset"):
        load_model(pth)
    with pytest.raises(ConversionError, match="not a checkpoint of a known layout"):
        load_checkpoint(pth, "lite-dino-r50-h3l1-2x3")


def test_load_authors_pth_with_preset(tmp_path):
    keys = FIXTURES / "official_lite_dino_r50_state_dict_keys.json"
    if not keys.exists():
        pytest.skip(f"{keys} is not present")
    g = torch.Generator().manual_seed(0)
    ours: dict[str, torch.Tensor] = {}  # the authors share class/box heads under several names: equal tensors
    state = {}
    for key, shape in json.loads(keys.read_text()).items():
        (target,) = rename_official({key: torch.zeros(shape)}, official_rules("lite-dino"))
        state[key] = ours.setdefault(target, torch.randn(shape, generator=g))
    path = tmp_path / "r50_s3ex3.pth"
    torch.save({"model": state}, path)
    loaded = load_checkpoint(path, "lite-dino-r50-h3l1-2x3")
    loaded_state = loaded.state_dict()
    for key, value in ours.items():
        assert torch.equal(loaded_state[key], value.to(loaded_state[key].dtype)), key
