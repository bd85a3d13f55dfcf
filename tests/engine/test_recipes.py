"""engine.recipes: the small-data recipe, and independent runs as subprocesses, a few at a time."""

from __future__ import annotations

import sys

import pytest

from litedetr.engine.recipes import SMALL_DATA, DemoRecipe, SmallDataRecipe, run_in_parallel


def test_runs_in_parallel_return_each_exit_code_and_log_each_output(tmp_path):
    # each command records how many of its siblings are running at its start, then waits for a file
    script = (
        "import pathlib, sys, time\n"
        "root = pathlib.Path(sys.argv[1]); i = sys.argv[2]\n"
        "(root / f'start{i}').touch(); print('running', len(list(root.glob('start*'))) - len(list(root.glob('end*'))))\n"
        "time.sleep(0.5); (root / f'end{i}').touch(); print('run', i); sys.exit(int(i))\n"
    )
    commands = [([sys.executable, "-c", script, str(tmp_path), str(i)], tmp_path / "logs" / f"{i}.log") for i in range(4)]
    assert run_in_parallel(commands, jobs=2) == [0, 1, 2, 3]
    logs = [(tmp_path / "logs" / f"{i}.log").read_text().split("\n") for i in range(4)]
    assert [log[1] for log in logs] == [f"run {i}" for i in range(4)]
    assert max(int(log[0].split()[1]) for log in logs) <= 2  # never more than two at a time


def test_small_data_recipe_changes_weights_only_for_a_model_without_a_trained_start():
    recipe = SmallDataRecipe(lr=3e-4, backbone_lr=5e-4, imagenet_backbone_ratio=0.2)
    training = {"dn_number": 100, "encoder_one_to_many": 6, "class_loss_weight": 8.0}
    scratch = {"num_queries": 200, "num_select": 100, "learned_query_content": False, "query_nms": 0.7, "kda_zero_query": True}
    assert recipe.model_overrides(init=True) == recipe.model_overrides(init=True, backbone_weights=True) == training
    assert recipe.model_overrides(backbone_weights=True) == {**training, **scratch}
    assert recipe.model_overrides() == {**training, **scratch, "backbone_trainable_norm": True}
    assert recipe.lr_backbone() == 5e-4 and recipe.lr_backbone(backbone_weights=True) == pytest.approx(6e-5)
    assert dict(DemoRecipe.model_overrides) == SMALL_DATA.model_overrides() and (DemoRecipe.lr, DemoRecipe.lr_backbone) == (SMALL_DATA.lr, SMALL_DATA.backbone_lr)  # the demo trains with it
