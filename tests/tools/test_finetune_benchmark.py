"""benchmarks/finetune.py: its runs, the fine-tuning budget and datasets (no training)."""

from __future__ import annotations

import pytest
from conftest import benchmark_script

from litedetr.data import KINDS
from litedetr.engine.recipes import DemoRecipe, lite_dino_variants, scaled_recipe
from litedetr.models.pretrained import match_classes


@pytest.fixture(scope="module")
def finetune():
    with benchmark_script("finetune") as module:
        yield module


def test_every_model_pretrained_and_from_scratch_and_lite_from_dino(finetune):
    names = [run.name for run in finetune.plan(("h3l1-2x3", "dino", "h3l1-2x3-msda"))]
    assert names == [
        "h3l1-2x3-from-h3l1-2x3", "h3l1-2x3-scratch", "h3l1-2x3-from-dino",
        "dino-from-dino", "dino-scratch",
        "h3l1-2x3-msda-from-h3l1-2x3-msda", "h3l1-2x3-msda-scratch", "h3l1-2x3-msda-from-dino",
    ]  # fmt: skip
    assert [run.label for run in finetune.plan(("h3l1-2x3", "dino"))] == ["pretrained", "scratch", "from pretrained DINO", "pretrained", "scratch"]
    assert [run.name for run in finetune.plan(("h3l1-2x3",))] == ["h3l1-2x3-from-h3l1-2x3", "h3l1-2x3-scratch"]


def test_fine_tuning_gets_a_quarter_of_the_pretraining_steps_on_new_classes(finetune, tmp_path, tiny_synthetic):
    pretrain = scaled_recipe()
    assert pretrain == DemoRecipe()
    recipe = finetune.finetune_recipe(pretrain, epochs=3, images=500)
    steps = lambda r: r.epochs * r.data.num_train // r.batch_size  # noqa: E731
    assert steps(recipe) * 4 == steps(pretrain) == 1500
    assert recipe.data.kind == "glyphs" and recipe.lr_drop == (2,) and (recipe.lr, recipe.image_size) == (pretrain.lr, pretrain.image_size)
    assert not match_classes(KINDS["glyphs"].classes, KINDS["shapes"].classes)  # every class row starts fresh
    variant = lite_dino_variants()["h3l1-2x3"]
    scratch = finetune.finetune_config(recipe, variant, tiny_synthetic, None)
    started = finetune.finetune_config(recipe, variant, tiny_synthetic, tmp_path / "model.safetensors")
    assert scratch.init is None and started.init == str(tmp_path / "model.safetensors")
    assert started.changed_fields(scratch.to_dict()) == ["init"]
