"""Starting a model from a trained checkpoint (``init``): every fitting tensor copied bit-exactly,
class rows carried over by class name, everything else refused by name."""

from __future__ import annotations

import logging
import math
import re

import pytest
import torch
from conftest import random_checkpoint

from litedetr.models.heads import PRIOR_PROBABILITY
from litedetr.weights import ConversionError, build_model, init_from_checkpoint, load_checkpoint, save_model
from litedetr.weights.classes import COCO_CLASSES, class_key, coco_class_names, match_classes
from litedetr.weights.keys import CLASS_TENSORS

CLASSES = ("Dog", "zebra", "widget")
"""A user's dataset: two COCO classes (by another spelling) and one COCO lacks."""
DOG, ZEBRA = 18, 24
PRIOR_BIAS = -math.log((1 - PRIOR_PROBABILITY) / PRIOR_PROBABILITY)


def is_class_tensor(key: str) -> bool:
    return any(re.fullmatch(p, key) for p in CLASS_TENSORS)


def test_coco_names_and_matching():
    assert len(COCO_CLASSES) == 80 and len(coco_class_names()) == 91
    assert coco_class_names()[DOG] == "dog" and coco_class_names()[0] == "" and coco_class_names()[12] == ""
    assert match_classes(CLASSES, coco_class_names()) == {0: DOG, 1: ZEBRA}
    # case, spaces, underscores and hyphens do not matter; VOC's names of COCO classes are known
    assert match_classes(("Traffic_Light", "TV Monitor", "aeroplane", "hot-dog", "unicorn"), coco_class_names()) == {0: 10, 1: 72, 2: 5, 3: 58}
    assert class_key("Teddy  Bear") == class_key("teddy_bear") == "teddybear"


@pytest.mark.parametrize(
    "layout,preset",
    [
        ("dino", "dino-r50"),
        ("lite-dino", "lite-dino-r50-h3l1-2x3"),
        ("deformable-detr", "deformable-detr-r50"),
        ("h-detr", "h-detr-r50"),
    ],
)
def test_init_from_each_released_layout(tmp_path, caplog, layout, preset):
    state, ours = random_checkpoint(layout, torch.Generator().manual_seed(0))
    path = tmp_path / "released.pth"
    torch.save({"model": state}, path)
    with caplog.at_level(logging.INFO, logger="litedetr.weights.loading"):
        model = build_model(preset, init=str(path), num_classes=3, class_names=CLASSES)
    loaded = model.state_dict()
    # every tensor that is not class-dependent: bit-exact, and nothing else came from elsewhere
    for key, value in ours.items():
        if not is_class_tensor(key):
            assert torch.equal(loaded[key], value), key
    assert not [k for k in loaded if k not in ours and not k.endswith("num_batches_tracked")]
    class_keys = [k for k in loaded if is_class_tensor(k)]
    assert class_keys and all(k in ours for k in class_keys)
    binary_proposals = layout in ("deformable-detr", "h-detr")
    for key in class_keys:
        theirs, mine = ours[key], loaded[key]
        assert mine.shape[0] == (4 if "label_embed" in key else 3)
        objectness = binary_proposals and key.startswith("query_selection.class_head")
        assert torch.equal(mine[0], theirs[0 if objectness else DOG]), key
        assert torch.equal(mine[1], theirs[ZEBRA]), key
        if key.endswith("bias"):
            assert mine[2].item() == pytest.approx(PRIOR_BIAS), key  # widget: the focal-loss prior of a fresh head
        else:
            assert not any(torch.equal(mine[2], row) for row in theirs), key
        if "label_embed" in key:
            assert torch.equal(mine[3], theirs[91])  # DINO's extra label row
    assert "2 of 3 classes carried over (Dog, zebra); new: widget" in caplog.text


def test_a_standard_checkpoint_starts_a_lite_model_and_lists_what_is_fresh(tmp_path, caplog):
    state, ours = random_checkpoint("dino", torch.Generator().manual_seed(1))
    path = tmp_path / "dino.pth"
    torch.save({"model": state}, path)
    with caplog.at_level(logging.INFO, logger="litedetr.weights.loading"):
        model = build_model("lite-dino-r50-h3l1-2x3", init=str(path), num_classes=2, class_names=("person", "car"))
    loaded = model.state_dict()
    fresh = [k for k in loaded if k not in ours and not k.endswith("num_batches_tracked")]
    assert fresh and all(".ffn_low." in k or ".query_proj." in k for k in fresh)
    assert torch.equal(loaded["encoder.layers.5.self_attn.value_proj.weight"], ours["encoder.layers.5.self_attn.value_proj.weight"])
    assert torch.equal(loaded["heads.class_heads.0.weight"], ours["heads.class_heads.0.weight"][[1, 3]])
    assert "fresh: " in caplog.text and "encoder.layers.{1,3,5}.ffn_low.linear1" in caplog.text
    assert "dropped: " in caplog.text and "self_attn.attention_weights" in caplog.text


def test_query_logits_take_plain_attentions_weights_from_a_standard_checkpoint_and_start_at_zero_without(tmp_path):
    """``kda_query_logits``: a DINO checkpoint's ``attention_weights`` become the KDA layers' query-only
    logits (nothing dropped); the authors' Lite-DINO has none, so they start at zero and the model computes
    the authors' KDA, every checkpoint tensor bit-exact."""
    dino_state, dino = random_checkpoint("dino", torch.Generator().manual_seed(1))
    lite_state, lite = random_checkpoint("lite-dino", torch.Generator().manual_seed(2))
    torch.save({"model": dino_state}, tmp_path / "dino.pth")
    torch.save({"model": lite_state}, tmp_path / "lite.pth")
    preset = "lite-dino-r50-h3l1-2x3"
    from_dino = build_model(preset, init=str(tmp_path / "dino.pth"), kda_query_logits=True).state_dict()
    carried = [k for k in from_dino if ".attention_weights." in k]
    assert carried and all(torch.equal(from_dino[k], dino[k]) for k in carried)
    assert "encoder.layers.0.self_attn.attention_weights.weight" in carried and "decoder.layers.5.cross_attn.attention_weights.weight" in carried
    from_lite = build_model(preset, init=str(tmp_path / "lite.pth"), kda_query_logits=True).state_dict()
    fresh = [k for k in from_lite if k not in lite and not k.endswith("num_batches_tracked")]
    assert fresh and all(".attention_weights." in k for k in fresh) and all(from_lite[k].abs().sum() == 0 for k in fresh)
    assert all(torch.equal(from_lite[k], lite[k]) for k in lite)


@pytest.fixture(scope="module")
def tiny_source(tmp_path_factory):
    source = build_model("dino-r18-tiny", num_classes=3, class_names=("cat", "dog", "zebra"), dn_number=10)
    path = tmp_path_factory.mktemp("source") / "cats.safetensors"
    save_model(source, path)
    return source, path


def test_init_from_our_model_file_with_the_same_classes_is_a_copy(tiny_source):
    source, path = tiny_source
    model = build_model("dino-r18-tiny", init=str(path), num_classes=3, class_names=("CAT", "Dog", "zebra"), dn_number=10)
    theirs = source.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in model.state_dict().items())


def test_init_reorders_classes_by_name(tiny_source):
    source, path = tiny_source
    model = build_model("dino-r18-tiny", num_classes=2, class_names=("zebra", "cat"), dn_number=10)
    report = init_from_checkpoint(model, path)
    assert report.classes_kept == [("zebra", "zebra"), ("cat", "cat")] and report.classes_new == []
    theirs = source.state_dict()["heads.class_heads.0.weight"]
    assert torch.equal(model.state_dict()["heads.class_heads.0.weight"], theirs[[2, 0]])
    embed = source.state_dict()["training_queries.label_embed.weight"]
    assert torch.equal(model.state_dict()["training_queries.label_embed.weight"], embed[[2, 0, 3]])


def test_class_tensors_the_model_lacks_are_dropped_and_those_the_checkpoint_lacks_start_fresh(tiny_source, tmp_path):
    source, path = tiny_source
    without_dn = build_model("dino-r18-tiny", num_classes=3, class_names=("cat", "dog", "zebra"), dn_number=0)
    report = init_from_checkpoint(without_dn, path)
    assert report.dropped == {"training_queries.label_embed.weight"}
    save_model(without_dn, tmp_path / "no_dn.safetensors")
    with_dn = build_model("dino-r18-tiny", num_classes=3, class_names=("cat", "dog", "zebra"), dn_number=10)
    assert init_from_checkpoint(with_dn, tmp_path / "no_dn.safetensors").fresh == {"training_queries.label_embed.weight"}


def test_another_family_or_architecture_is_refused_by_name(tiny_source):
    _, path = tiny_source
    with pytest.raises(ConversionError, match="a dino checkpoint.*deformable-detr family"):
        build_model("deformable-detr-r18-tiny", init=str(path), num_classes=3)
    with pytest.raises(ConversionError, match=r"(?s)shape mismatches.*decoder\.layers\.0\.ffn\.linear1\.weight"):
        build_model("dino-r18-tiny", init=str(path), num_classes=3, decoder_ffn=64, dn_number=10)
    with pytest.raises(ConversionError, match=r"(?s)missing keys.*decoder\.layers\.3\."):
        build_model("dino-r18-tiny", init=str(path), num_classes=3, num_decoder_layers=4, dn_number=10)
    with pytest.raises(ValueError, match="no such checkpoint file"):
        build_model("dino-r18-tiny", init="missing.safetensors", num_classes=3)
    with pytest.raises(ValueError, match="not both"):
        build_model("dino-r18-tiny", init=str(path), backbone_weights="imagenet", num_classes=3)


def test_unnamed_classes_of_the_same_count_carry_over_row_by_row(tmp_path, caplog):
    """Neither side names its classes: with equal counts every row carries over (issue 25 item 2)."""
    source = build_model("dino-r18-tiny", num_classes=3, dn_number=10)
    save_model(source, tmp_path / "unnamed.safetensors")
    with caplog.at_level(logging.INFO, logger="litedetr.weights.loading"):
        model = build_model("dino-r18-tiny", init=str(tmp_path / "unnamed.safetensors"), num_classes=3, dn_number=10)
    theirs = source.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in model.state_dict().items())
    assert "3 of 3 classes carried over" in caplog.text
    other = build_model("dino-r18-tiny", num_classes=2, dn_number=10)  # another count: nothing to pair the rows by
    assert init_from_checkpoint(other, tmp_path / "unnamed.safetensors").classes_kept == []


def test_a_released_coco_checkpoint_names_its_classes_through_convert_and_init(tmp_path, caplog):
    """A 91-row .pth converts to a model file with COCO's names and ids, and both starts keep the rows (items 1 and 2)."""
    state, ours = random_checkpoint("dino", torch.Generator().manual_seed(2))
    torch.save({"model": state}, tmp_path / "coco.pth")
    converted = load_checkpoint(tmp_path / "coco.pth", "dino-r50")
    save_model(converted, tmp_path / "coco.safetensors")
    assert converted.config.class_names == coco_class_names() and converted.config.category_ids == tuple(range(91))
    assert converted.config.class_name(DOG) == "dog"
    for start in ("coco.pth", "coco.safetensors"):
        for names in ((), ("person", "car")):
            caplog.clear()
            with caplog.at_level(logging.INFO, logger="litedetr.weights.loading"):
                model = build_model("dino-r50", init=str(tmp_path / start), **({"num_classes": 2, "class_names": names} if names else {}))
            rows = [1, 3] if names else list(range(91))
            assert torch.equal(model.state_dict()["heads.class_heads.0.weight"], ours["heads.class_heads.0.weight"][rows]), (start, names)
            assert f"{len(rows)} of {len(rows)} classes carried over" in caplog.text, (start, names)


@pytest.mark.parametrize(
    "wrap, weights, read",
    [
        (lambda s, e: {"state_dict": s}, "auto", "model"),
        (lambda s, e: {"model": {"module." + k: v for k, v in s.items()}}, "auto", "model"),  # saved from a DDP-wrapped model
        (lambda s, e: {"ema": e}, "auto", "ema"),
        (lambda s, e: {"model_ema": e}, "ema", "ema"),
        (lambda s, e: {"model": s, "ema_model": {"module." + k: v for k, v in e.items()}}, "auto", "ema"),  # DINO's --use_ema
        (lambda s, e: {"model": s, "ema_model": e}, "model", "model"),
        (lambda s, e: s, "auto", "model"),  # a bare state dict
    ],
)
def test_checkpoints_as_people_save_them(tmp_path, caplog, wrap, weights, read):
    """Wrappers, DDP's prefix and EMA weights are read, the EMA by default, and the log says which (issue 25 item 4)."""
    state, ours = random_checkpoint("dino", torch.Generator().manual_seed(3))
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in state.items()}
    saved = wrap(state, ema)
    torch.save(saved, tmp_path / "saved.pth")
    with caplog.at_level(logging.INFO):
        model = load_checkpoint(tmp_path / "saved.pth", "dino-r50", weights=weights)
        converted = build_model("dino-r50", init=str(tmp_path / "saved.pth"), init_weights=weights)
    expected = ours["heads.class_heads.0.weight"] + (1 if read == "ema" else 0)
    for loaded in (model, converted):
        assert torch.equal(loaded.state_dict()["heads.class_heads.0.weight"], expected)
    assert ("it also holds" in caplog.text) == ("model" in saved and "ema_model" in saved)


def test_asking_for_missing_ema_weights_names_the_keys(tmp_path):
    state, _ = random_checkpoint("dino", torch.Generator().manual_seed(4))
    torch.save({"model": state}, tmp_path / "plain.pth")
    with pytest.raises(ValueError, match="no EMA weights under any of ema_model, model_ema, ema, state_dict_ema; its keys: model"):
        load_checkpoint(tmp_path / "plain.pth", "dino-r50", weights="ema")


@pytest.mark.parametrize("layout, preset, depth", [("deformable-detr", "deformable-detr-r50", 6), ("dino", "dino-r50", 6)])
def test_a_decoder_depth_other_than_the_checkpoints_is_named(tmp_path, layout, preset, depth):
    """The depth comes from the checkpoint's class heads, not from how the model maps them (issue 25 item 5)."""
    state, _ = random_checkpoint(layout, torch.Generator().manual_seed(5))
    torch.save({"model": state}, tmp_path / "released.pth")
    message = f"the checkpoint's decoder has {depth} layers .* the model 3; set num_decoder_layers={depth}"
    with pytest.raises(ConversionError, match=message):
        load_checkpoint(tmp_path / "released.pth", preset, num_decoder_layers=3)
    with pytest.raises(ConversionError, match=message):
        build_model(preset, init=str(tmp_path / "released.pth"), num_decoder_layers=3)
