"""engine.recipes: the small-data recipe and the from-scratch model changes."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from litedetr.engine.recipes import FROM_SCRATCH, LITE_PRESET, SMALL_DATA, DemoRecipe, SmallDataRecipe
from litedetr.models import get_config
from litedetr.weights import build_model


def test_small_data_recipe_changes_weights_only_for_a_model_without_a_trained_start():
    recipe = SmallDataRecipe(lr=3e-4, backbone_lr=5e-4, imagenet_backbone_ratio=0.2)
    training = {"dn_number": 100, "encoder_one_to_many": 6, "class_loss_weight": 8.0}
    scratch = {"num_queries": 200, "num_select": 100, "learned_query_content": False, "query_nms": 0.7, "kda_zero_query": True, "kda_query_logits": True}
    assert recipe.model_overrides(init=True) == recipe.model_overrides(init=True, backbone_weights=True) == training
    assert recipe.model_overrides(backbone_weights=True) == {**training, **scratch}
    assert recipe.model_overrides() == {**training, **scratch, "backbone_trainable_norm": True}
    assert recipe.lr_backbone() == 5e-4 and recipe.lr_backbone(backbone_weights=True) == pytest.approx(6e-5)
    assert dict(DemoRecipe.model_overrides) == SMALL_DATA.model_overrides() and (DemoRecipe.lr, DemoRecipe.lr_backbone) == (
        SMALL_DATA.lr,
        SMALL_DATA.backbone_lr,
    )  # the demo trains with it


def _state(preset: str, **overrides) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return build_model(preset, num_classes=3, **overrides).state_dict()


def test_from_scratch_changes_only_models_with_kda():
    msda = {"encoder": dataclasses.replace(get_config(LITE_PRESET).encoder, key_aware=False), "decoder_key_aware": False}
    for preset, overrides in (("dino-r18-tiny", {}), (LITE_PRESET, msda)):  # no KDA layer: the same weights, value for value
        plain, scratch = _state(preset, **overrides), _state(preset, **overrides, **dict(FROM_SCRATCH))
        assert plain.keys() == scratch.keys() and all(torch.equal(plain[k], scratch[k]) for k in plain)
    plain, scratch = _state(LITE_PRESET), _state(LITE_PRESET, **dict(FROM_SCRATCH))
    added = sorted(scratch.keys() - plain.keys())  # KDA: each layer's query-only logits, starting at zero
    assert added and all(".attention_weights." in k and not scratch[k].any() for k in added)
    assert all(not scratch[k].any() for k in scratch if k.endswith("query_proj.weight")) and any(
        plain[k].any() for k in plain if k.endswith("query_proj.weight")
    )
