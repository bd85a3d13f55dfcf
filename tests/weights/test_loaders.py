"""The two public loaders: load_model (our model files) and load_checkpoint (a checkpoint of another
code base, or of ours into another preset, with or without a class map), both on init_from_checkpoint's pipeline."""

from __future__ import annotations

import argparse
import re

import pytest
import torch
from conftest import random_checkpoint

import litedetr
from litedetr import weights
from litedetr.weights import ConversionError, build_model, init_from_checkpoint, load_checkpoint, load_model, save_model
from litedetr.weights.classes import coco_class_names
from litedetr.weights.keys import is_class_tensor

DOG, ZEBRA = 18, 24


def test_the_top_level_names_are_the_weights_packages():
    for name in ("build_model", "load_model", "load_checkpoint", "save_model"):
        assert getattr(litedetr, name) is getattr(weights, name)
    assert not hasattr(litedetr.models, "load_model") and not hasattr(litedetr.models.Detector, "from_checkpoint")


def test_a_released_checkpoint_with_a_class_map_is_the_pipelines_start(tmp_path):
    """load_checkpoint(class_names=...) == build_model(init=...): every tensor but the class rows copied, rows by name."""
    state, ours = random_checkpoint("dino", torch.Generator().manual_seed(3))
    path = tmp_path / "coco.pth"
    torch.save({"model": state}, path)
    names = ("Zebra", "widget", "dog")
    torch.manual_seed(0)  # the same fresh rows for the class the checkpoint lacks
    loaded = load_checkpoint(path, "dino-r50", class_names=names)
    torch.manual_seed(0)
    built = build_model("dino-r50", init=path, num_classes=3, class_names=names)
    assert not loaded.training and loaded.config.class_names == names and loaded.config.num_classes == 3
    reference = built.state_dict()
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, reference[key]), key
        if is_class_tensor(key):
            assert torch.equal(value[[0, 2]], ours[key][[ZEBRA, DOG]]), key
        elif key in ours:
            assert torch.equal(value, ours[key].to(value.dtype)), key
    assert not torch.equal(loaded.state_dict()["heads.class_heads.0.bias"][1], ours["heads.class_heads.0.bias"][0])


def test_a_released_checkpoint_without_a_class_map_keeps_its_91_rows_and_names_them(tmp_path):
    state, ours = random_checkpoint("deformable-detr", torch.Generator().manual_seed(4))
    path = tmp_path / "deformable.pth"
    torch.save({"model": state}, path)
    model = load_checkpoint(path, "deformable-detr-r50")
    assert model.config.class_names == coco_class_names() and model.config.category_ids == tuple(range(91))
    own = model.state_dict()
    assert own.keys() == ours.keys() and all(torch.equal(own[k], v) for k, v in ours.items())


def test_our_model_file_into_a_lite_preset_of_its_family_keeps_its_classes(tmp_path):
    source = build_model("dino-r18-tiny", num_classes=2, class_names=("cat", "dog"), category_ids=(3, 7))
    path = tmp_path / "dino.safetensors"
    save_model(source, path)
    lite = load_checkpoint(path, "lite-dino-r18-tiny-h3l1-2x3")
    assert (lite.config.class_names, lite.config.category_ids, lite.config.encoder.kind) == (("cat", "dog"), (3, 7), "lite")
    theirs, own = source.state_dict(), lite.state_dict()
    shared = [k for k in own if k in theirs and not k.startswith("encoder.")]
    assert len(shared) > 100 and all(torch.equal(own[k], theirs[k]) for k in shared)
    assert torch.equal(own["encoder.layers.0.self_attn.value_proj.weight"], theirs["encoder.layers.0.self_attn.value_proj.weight"])
    # the same file, our classes renamed: only the class rows differ from the copy
    renamed = load_checkpoint(path, "lite-dino-r18-tiny-h3l1-2x3", class_names=("dog", "bird"))
    assert torch.equal(renamed.state_dict()["heads.class_heads.0.weight"][0], theirs["heads.class_heads.0.weight"][1])


def test_another_family_is_refused_by_name_before_loading(tmp_path):
    state, _ = random_checkpoint("h-detr", torch.Generator().manual_seed(5))
    path = tmp_path / "h_detr.pth"
    torch.save({"model": state}, path)
    with pytest.raises(ConversionError, match=r"h_detr\.pth: a h-detr checkpoint, but preset 'dino-r50' is of the dino family"):
        load_checkpoint(path, "dino-r50")
    with pytest.raises(ConversionError, match=r"a h-detr checkpoint \(h-detr\), but the model is of the dino family"):
        load_checkpoint(path, "dino-r50", class_names=("dog",))


def test_load_model_says_which_loader_a_pth_needs(tmp_path):
    plain = tmp_path / "plain.pth"
    torch.save({"model": {"transformer.level_embed": torch.zeros(4, 256)}}, plain)
    with pytest.raises(ValueError, match=re.escape("pass its preset (load_checkpoint(path, preset)")):
        load_model(plain)
    run = tmp_path / "checkpoint.pt"
    torch.save({"model": {}, "train_config": {}, "args": argparse.Namespace()}, run)
    with pytest.raises(ValueError, match="a litedetr training checkpoint"):
        load_model(run)


def test_a_model_file_whose_weights_do_not_fit_its_config_is_named(tmp_path):
    model = build_model("dino-r18-tiny", num_classes=2)
    path = tmp_path / "m.safetensors"
    save_model(model, path)
    from safetensors.torch import load_file, safe_open, save_file

    tensors = load_file(path)
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    del tensors["heads.box_heads.0.layers.0.bias"]
    save_file(tensors, path, metadata=metadata)
    with pytest.raises(ValueError, match=r"the weights do not fit the file's own config\nmissing keys \(1\):\n    heads\.box_heads\.0\.layers\.0\.bias"):
        load_model(path)


def test_init_from_checkpoint_and_load_checkpoint_report_the_same_kept_classes(tmp_path, caplog):
    state, _ = random_checkpoint("dino", torch.Generator().manual_seed(6))
    path = tmp_path / "coco.pth"
    torch.save({"model": state}, path)
    model = build_model("dino-r50", num_classes=2, class_names=("dog", "zebra"))
    report = init_from_checkpoint(model, path)
    assert report.classes_kept == [("dog", "dog"), ("zebra", "zebra")] and report.source == "dino" and report.fresh == set()
