"""engine.recipes: the small-data recipe."""

from __future__ import annotations

import pytest

from litedetr.engine.recipes import SMALL_DATA, DemoRecipe, SmallDataRecipe


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
