"""benchmarks/finetune.py: its runs, the fine-tuning budget and datasets (no training)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from conftest import benchmark_script

from litedetr.bench.runs import lite_dino_variants, scaled_recipe
from litedetr.data import KINDS
from litedetr.engine.recipes import DemoRecipe
from litedetr.weights.classes import match_classes


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
    assert finetune.DEFAULT_MODELS == ("h3l1-2x3-ql", "dino", "h3l1-2x3-msda")  # the demo's model as litedetr trains it first
    assert set(finetune.MODELS) <= set(lite_dino_variants())


def test_fine_tuning_trains_new_classes_on_the_demo_recipe(finetune, tmp_path, tiny_synthetic):
    pretrain = scaled_recipe()
    assert pretrain == DemoRecipe()
    recipe = finetune.finetune_recipe(pretrain, epochs=3, images=500)
    assert finetune._steps(pretrain) == 12 * 75  # the demo's epochs of 75 batches
    assert finetune._steps(recipe) == 3 * 125  # whole epochs: 500 images make 125 batches
    assert recipe.data.kind == "glyphs" and recipe.lr_drop == (2,) and (recipe.lr, recipe.image_size) == (pretrain.lr, pretrain.image_size)
    assert recipe.model_overrides == pretrain.model_overrides
    assert not match_classes(KINDS["glyphs"].classes, KINDS["shapes"].classes)  # every class row starts fresh
    variant = lite_dino_variants()["h3l1-2x3"]
    scratch = finetune.finetune_config(recipe, variant, tiny_synthetic, None)
    started = finetune.finetune_config(recipe, variant, tiny_synthetic, tmp_path / "model.safetensors")
    assert scratch.init is None and started.init == str(tmp_path / "model.safetensors")
    assert started.changed_fields(scratch.to_dict()) == ["init"]


def _seed(seed, aps):
    """One seed's result with the given AP per run of ``plan(("h3l1-2x3",))`` (pretrained, scratch)."""
    rows = [
        {
            "run": name,
            "model": "h3l1-2x3",
            "model_label": "Lite",
            "start": start,
            "metrics": {"AP": ap, "AP50": 2 * ap, "APs": None, "APm": None, "APl": None},
            "train_seconds": 1.0,
        }
        for (name, start), ap in zip((("h3l1-2x3-from-h3l1-2x3", "pretrained"), ("h3l1-2x3-scratch", "scratch")), aps)
    ]
    return {"seed": seed, "pretrained": {"h3l1-2x3": {"label": "Lite", "metrics": {"AP": 0.3 + seed / 100, "AP50": 0.5}}}, "rows": rows}


def test_seeds_are_summarised_per_run_with_wins_over_scratch(finetune):
    rows, pretrained = finetune.summarize([_seed(0, (0.20, 0.10)), _seed(1, (0.05, 0.08)), _seed(2, (0.30, 0.12))])
    assert [(r["run"], r["beats_scratch"]) for r in rows] == [("h3l1-2x3-from-h3l1-2x3", 2), ("h3l1-2x3-scratch", None)]
    assert rows[0]["metrics"]["AP"] == [0.20, 0.05, 0.30] and rows[1]["metrics"]["AP50"] == [0.20, 0.16, 0.24]
    assert pretrained["h3l1-2x3"]["metrics"]["AP"] == [0.30, 0.31, 0.32]
    meta = {
        "pretrain_images": 8,
        "pretrain_steps": 2,
        "finetune_images": 8,
        "finetune_steps": 2,
        "batch_size": 4,
        "image_size": 128,
        "lr": 4e-4,
        "lr_backbone": 1e-3,
        "seeds": [0, 1, 2],
    }
    table = finetune.markdown(rows, pretrained, meta)
    assert "lr 0.0004 (backbone 0.001; 10x lower in the last epoch)" in table
    assert "| Lite | pretrained | 20.0 [5.0-30.0] | 40.0 [10.0-60.0] | - | - | - | 2 of 3 |" in table
    assert "| Lite | scratch | 10.0 [8.0-12.0] |" in table and "- Lite: 31.0 [30.0-32.0] / 50.0 [50.0-50.0]" in table


def test_each_seed_worker_gets_the_budget_options_but_not_the_seeds(finetune):
    args = argparse.Namespace(models=["dino"], out=Path("o"), threads=1, pretrain_epochs=None, finetune_epochs=3, train_images=8,
                              val_images=None, finetune_images=500, image_size=128, seeds=[0, 1], jobs=2, pretrained_runs=None)  # fmt: skip
    assert finetune._worker_arguments(args) == [
        "--models", "dino", "--out", "o", "--threads", "1", "--finetune-epochs", "3", "--train-images", "8", "--finetune-images", "500", "--image-size", "128",
    ]  # fmt: skip
    args.pretrained_runs = ["dino=runs/dino-seed{seed}"]
    assert finetune._worker_arguments(args)[:4] == ["--models", "dino", "--pretrained-runs", "dino=runs/dino-seed{seed}"]


def test_pretrained_runs_name_one_folder_pattern_per_chosen_model(finetune, capsys):
    parser = argparse.ArgumentParser()
    models = ("h3l1-2x3", "dino")
    assert finetune.parse_pretrained_runs(["dino=a/s{seed}", "h3l1-2x3=b={seed}"], models, parser) == {"dino": "a/s{seed}", "h3l1-2x3": "b={seed}"}
    for bad in (["dino=a/s0"], ["h3l1-2x3-msda=a{seed}"], ["dino"], ["dino=a{seed}", "dino=b{seed}"]):
        with pytest.raises(SystemExit):
            finetune.parse_pretrained_runs(bad, models, parser)
        assert "--pretrained-runs" in capsys.readouterr().err


def test_a_pretrained_run_that_trained_something_else_stops_the_seed_with_one_line(finetune, tmp_path):
    from litedetr.bench.runs import dataset_dir
    from litedetr.data import write_synthetic_dataset

    pretrain = scaled_recipe(1, 4, 2, 64)
    tuning = finetune.finetune_recipe(pretrain, epochs=1, images=4)
    for recipe in (pretrain, tuning):
        write_synthetic_dataset(dataset_dir(tmp_path, recipe.data), recipe.data)
    with pytest.raises(SystemExit, match=r"^--pretrained-runs h3l1-2x3: .*missing0/checkpoint.pt: not a readable litedetr training checkpoint"):
        finetune.seed_runs(pretrain, tuning, ("h3l1-2x3",), tmp_path, tmp_path / "seed0", {"h3l1-2x3": str(tmp_path / "missing{seed}")})
    assert not (tmp_path / "seed0").exists()  # nothing trained before the check
