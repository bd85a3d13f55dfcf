"""The family registry: presets, parts and checkpoint conversion all derive from its rows."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from litedetr.models import Detector, get_config
from litedetr.models.config import PRESETS, DetectorConfig, EncoderConfig
from litedetr.models.families import FAMILIES, LAYOUTS, get_family
from litedetr.models.parts import build_parts
from litedetr.models.query_selection import BoxEmbeddingQuerySelection, MixedQuerySelection
from litedetr.weights.keys import official_rules, standard_encoder_layout


def test_each_layout_loads_into_its_family_with_its_encoder():
    found = {name: (family.name, layout.lite_encoder) for name, (layout, family) in LAYOUTS.items()}
    assert found == {
        "lite-dino": ("dino", True),
        "dino": ("dino", False),
        "deformable-detr": ("deformable-detr", False),
        "h-detr": ("h-detr", False),
    }
    assert [standard_encoder_layout(name) for name in ("lite-dino", "dino", "deformable-detr", "h-detr", None)] == [False, True, True, True, False]


def test_renaming_rules_follow_the_code_base_not_the_family_name():
    # H-DETR is Deformable DETR's code base: the same key names, with the proposals' head after the decoder's
    assert official_rules("h-detr", 3) == official_rules("deformable-detr", 3)
    assert ("(?:transformer\\.decoder\\.)?class_embed\\.3\\.(.+)", "query_selection.class_head.\\1") in official_rules("h-detr", 3)
    assert official_rules("lite-dino") == official_rules("dino")
    assert official_rules("dino") != official_rules("deformable-detr")
    with pytest.raises(ValueError, match="unknown checkpoint layout 'detr'; known: deformable-detr, lite-dino, dino, h-detr"):
        official_rules("detr")


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_a_family_base_preset_is_its_row(name):
    family = FAMILIES[name]
    defaults = dict(family.defaults)
    encoder = EncoderConfig(**defaults.pop("encoder", {}))
    for tag, backbone in (("r50", "resnet50"), ("swint", "swin_t")):
        assert PRESETS[f"{name}-{tag}"] == DetectorConfig(family=name, backbone=backbone, encoder=encoder, **defaults)
    lite = PRESETS[f"lite-{name}-r50-h3l1-2x3"]
    assert (lite.family, lite.encoder.kind, lite.encoder.d_ffn, lite.decoder_key_aware) == (name, "lite", encoder.d_ffn, True)


def test_the_rows_hold_what_the_code_bases_differ_in():
    dino, deformable, h_detr = FAMILIES["dino"], FAMILIES["deformable-detr"], FAMILIES["h-detr"]
    assert (dino.code_base, deformable.code_base, h_detr.code_base) == ("dino", "deformable-detr", "deformable-detr")
    assert h_detr.design is deformable.design
    assert dino.design.selection is MixedQuerySelection and deformable.design.selection is BoxEmbeddingQuerySelection
    assert [f.design.denoising for f in (dino, deformable, h_detr)] == [True, False, False]
    assert (PRESETS["dino-r50"].dn_number, PRESETS["h-detr-r50"].one_to_many_queries, PRESETS["deformable-detr-r50"].encoder.d_ffn) == (100, 1500, 1024)


def test_config_checks_name_the_registry():
    with pytest.raises(ValueError, match="^unknown family 'detr'; known: deformable-detr, dino, h-detr$"):
        DetectorConfig(family="detr")
    with pytest.raises(ValueError, match="^unknown family 'detr'"):
        get_family("detr")
    with pytest.raises(ValueError, match=r"denoising queries \(dn_number=5\) exist in the dino family only, not 'h-detr'"):
        dataclasses.replace(PRESETS["h-detr-r50"], dn_number=5, one_to_many_queries=0)


def test_a_detector_wires_the_parts_it_is_given():
    config = get_config("lite-dino-r18-tiny-h3l1-2x3", num_classes=3)
    torch.manual_seed(0)
    built = Detector(config).eval()
    torch.manual_seed(0)
    parts = build_parts(config)
    given = Detector(config, parts=parts).eval()
    assert given.encoder is parts.encoder and given.heads is parts.heads and given.criterion is parts.criterion
    image = [torch.rand(3, 96, 128, generator=torch.Generator().manual_seed(1))]
    with torch.no_grad():
        a, b = built(image)[0], given(image)[0]
    assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["scores"], b["scores"])
    # a replaced part is the one that runs
    other = build_parts(config)
    swapped = Detector(config, parts=parts._replace(heads=other.heads)).eval()
    with torch.no_grad():
        c = swapped(image)[0]
    assert not torch.equal(a["scores"], c["scores"])
