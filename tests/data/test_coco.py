"""COCO-format loading: category mapping, crowd boxes, empty images and every kind of bad input."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from conftest import coco_box, coco_image, write_coco

from litedetr.data import CocoDetection, collate, find_split

CATEGORIES = [{"id": 42, "name": "dog"}, {"id": 7, "name": "cat"}, {"id": 13, "name": "bird"}]


def test_category_ids_map_to_contiguous_labels_and_back(tmp_path):
    anns = [coco_box(1, 1, 42, [1, 2, 10, 10]), coco_box(2, 1, 7, [5, 5, 20, 10]), coco_box(3, 2, 13, [0, 0, 50, 40])]
    dataset = CocoDetection(*write_coco(tmp_path, [coco_image(1), coco_image(2)], anns, CATEGORIES))
    assert dataset.category_ids == (7, 13, 42) and dataset.class_names == ("cat", "bird", "dog")
    image, target = dataset[0]
    assert image.shape == (3, 40, 50) and image.dtype == torch.float32 and 0 <= image.min() <= image.max() <= 1
    assert target["labels"].tolist() == [2, 0] and target["image_id"] == 1
    assert target["boxes"].tolist() == [[1, 2, 11, 12], [5, 5, 25, 15]]  # xywh -> xyxy
    assert dataset.label_to_category(target["labels"]) == [42, 7]


def test_crowd_boxes_are_not_training_targets_and_empty_images_are_kept(tmp_path):
    anns = [coco_box(1, 1, 7, [1, 1, 10, 10]), coco_box(2, 1, 7, [20, 20, 10, 10], iscrowd=1)]
    dataset = CocoDetection(*write_coco(tmp_path, [coco_image(1), coco_image(2)], anns, CATEGORIES))
    assert len(dataset) == 2
    assert dataset[0][1]["boxes"].tolist() == [[1, 1, 11, 11]]
    assert dataset[1][1]["boxes"].shape == (0, 4) and dataset[1][1]["labels"].shape == (0,)


def test_unknown_category_id_stops_naming_the_annotation(tmp_path):
    anns = [coco_box(5, 1, 99, [1, 1, 10, 10])]
    with pytest.raises(ValueError, match=r"annotation 5 \(image 1\) has category_id 99, which is not among the categories \[7, 13, 42\]"):
        CocoDetection(*write_coco(tmp_path, [coco_image(1)], anns, CATEGORIES))


def test_degenerate_boxes_are_skipped_and_counted(tmp_path, caplog):
    anns = [coco_box(1, 1, 7, [1, 1, 0, 10]), coco_box(2, 1, 7, [1, 1, 10, -3]), coco_box(3, 1, 7, [1, 1, 10, 10])]
    with caplog.at_level(logging.WARNING):
        dataset = CocoDetection(*write_coco(tmp_path, [coco_image(1)], anns, CATEGORIES))
    assert dataset[0][1]["boxes"].tolist() == [[1, 1, 11, 11]]
    assert "skipped boxes of zero or negative size 2 (annotation ids [1, 2])" in caplog.text


def test_boxes_outside_the_image_are_clipped_or_skipped(tmp_path, caplog):
    anns = [coco_box(1, 1, 7, [-5, 30, 20, 20]), coco_box(2, 1, 7, [60, 10, 5, 5])]  # image is 50 wide, 40 high
    with caplog.at_level(logging.WARNING):
        dataset = CocoDetection(*write_coco(tmp_path, [coco_image(1)], anns, CATEGORIES))
    assert dataset[0][1]["boxes"].tolist() == [[0, 30, 15, 40]]
    assert "clipped boxes reaching outside their image 2 (annotation ids [1, 2])" in caplog.text
    assert "skipped boxes of zero or negative size 1 (annotation ids [2])" in caplog.text


def test_missing_image_files_are_skipped_and_an_empty_dataset_is_an_error(tmp_path, caplog):
    annotation_file, folder = write_coco(tmp_path, [coco_image(1), coco_image(2)], [], CATEGORIES)
    (folder / "002.png").unlink()
    with caplog.at_level(logging.WARNING):
        assert len(CocoDetection(annotation_file, folder)) == 1
    assert "skipped 1 images whose files are missing" in caplog.text and "002.png" in caplog.text
    (folder / "001.png").unlink()
    with pytest.raises(ValueError, match="no usable images"):
        CocoDetection(annotation_file, folder)


def test_corrupt_image_is_dropped_from_its_batch_with_a_warning(tmp_path, caplog):
    annotation_file, folder = write_coco(tmp_path, [coco_image(1), coco_image(2)], [], CATEGORIES)
    (folder / "001.png").write_bytes(b"not an image at all")
    dataset = CocoDetection(annotation_file, folder)
    with caplog.at_level(logging.WARNING):
        images, targets = collate([dataset[0], dataset[1]])
    assert len(images) == 1 and targets[0]["image_id"] == 2
    assert "skipped unreadable image" in caplog.text and "001.png" in caplog.text


def test_broken_annotation_files_are_named(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json: not valid JSON"):
        CocoDetection(bad, tmp_path)
    bad.write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match=r"not a COCO instances file, missing list\(s\) \['annotations', 'categories'\]"):
        CocoDetection(bad, tmp_path)
    with pytest.raises(ValueError, match="annotation file not found"):
        CocoDetection(tmp_path / "none.json", tmp_path)


def test_find_split_reads_cocos_layout(tmp_path):
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_val2017.json").write_text("{}")
    (tmp_path / "val2017").mkdir()
    split = find_split(tmp_path, "val")
    assert split.annotations.name == "instances_val2017.json" and split.images == tmp_path / "val2017"
    with pytest.raises(ValueError, match="no annotations/instances_train"):
        find_split(tmp_path, "train")


def test_16_bit_palette_and_alpha_images_are_read_as_they_look(tmp_path):
    """16-bit grayscale is scaled to 8 bits (not clipped to white); other modes convert to RGB."""
    import numpy as np
    from PIL import Image

    annotation_file, folder = write_coco(tmp_path, [coco_image(i, 40, 50) for i in (1, 2, 3)], [], CATEGORIES)
    ramp = (np.arange(40 * 50).reshape(40, 50) * 30).astype(np.uint16)  # 0..59970
    Image.fromarray(ramp).save(folder / "001.png")
    with Image.open(folder / "001.png") as stored:
        assert stored.mode.startswith("I")
    Image.fromarray((ramp // 257).astype(np.uint8), "L").convert("P").save(folder / "002.png")
    Image.fromarray(np.stack([(ramp // 257).astype(np.uint8)] * 2, -1), "LA").save(folder / "003.png")
    dataset = CocoDetection(annotation_file, folder)
    expected = torch.from_numpy(np.rint(ramp / 257).astype(np.uint8))
    sixteen = dataset.read_image(0)
    assert sixteen.shape == (3, 40, 50) and torch.equal(sixteen[0], expected) and torch.equal(sixteen[1], expected)
    assert (dataset.read_image(1)[0].int() - expected.int()).abs().max() <= 1
    assert (dataset.read_image(2)[0].int() - expected.int()).abs().max() <= 1


def test_cmyk_is_converted_and_undefined_pixel_ranges_are_refused_by_name(tmp_path):
    import numpy as np
    from PIL import Image

    from litedetr.models.inputs import load_image

    Image.fromarray(np.zeros((8, 8, 4), np.uint8), "CMYK").save(tmp_path / "cmyk.jpg")
    assert np.asarray(load_image(tmp_path / "cmyk.jpg")).min() >= 250  # no ink: white
    Image.fromarray(np.ones((8, 8), np.float32)).save(tmp_path / "float.tif")
    with pytest.raises(ValueError, match="float.tif: floating-point pixels"):
        load_image(tmp_path / "float.tif")
    Image.fromarray(np.full((8, 8), 70000, np.int32)).save(tmp_path / "wide.tif")
    with pytest.raises(ValueError, match="wide.tif: integer pixels outside 0..65535"):
        load_image(tmp_path / "wide.tif")


def test_one_orientation_rule_for_training_and_prediction(tmp_path, caplog):
    """EXIF orientation is applied when a dataset is read, as predict does, and sizes are checked after it."""
    import numpy as np
    from PIL import Image

    from litedetr.models.inputs import load_image

    annotation_file, folder = write_coco(tmp_path, [coco_image(1, 50, 40), coco_image(2, 40, 50)], [], CATEGORIES)
    pixels = np.zeros((40, 50, 3), np.uint8)
    pixels[:, :10] = 255  # a white band on the left of the stored image
    for name in ("001.png", "002.png"):
        exif = Image.Exif()
        exif[0x0112] = 6  # rotate 90 degrees clockwise to display
        Image.fromarray(pixels).save(folder / name, exif=exif)
    dataset = CocoDetection(annotation_file, folder)
    shown = dataset.read_image(0)
    assert shown.shape == (3, 50, 40) and torch.equal(shown, torch.from_numpy(np.array(load_image(folder / "001.png"))).permute(2, 0, 1))
    assert shown[:, :10].float().mean() == 255 and shown[:, -10:].float().mean() == 0  # the band is on top once rotated
    with caplog.at_level(logging.WARNING):
        assert dataset.read_image(1) is None  # its JSON gives the stored (unrotated) size
    assert "differs from the annotation's" in caplog.text and "002.png" in caplog.text
