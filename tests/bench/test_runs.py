"""bench.runs: finished runs taken from elsewhere, and independent runs as subprocesses, a few at a time."""

from __future__ import annotations

import dataclasses
import json
import sys

import pytest

from litedetr.bench.runs import finished_run_metrics, lite_dino_variants, run_in_parallel, scaled_recipe, variant_recipe
from litedetr.data import SyntheticSpec, write_synthetic_dataset
from litedetr.engine import CHECKPOINT
from litedetr.engine.recipes import demo_train_config
from litedetr.engine.state import save_state


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


def _finished_run(run_dir, config, ap=0.4, epoch=None):
    """A run folder as the trainer leaves it: the checkpoint's config and the evaluation after epoch ``epoch``
    (default the last)."""
    run_dir.mkdir(parents=True)
    save_state(run_dir / CHECKPOINT, {"train_config": json.dumps(config.to_dict()), "epoch": config.epochs})
    record = {"kind": "eval", "epoch": epoch or config.epochs, "step": 9, "AP": ap, "AP50": 2 * ap}
    (run_dir / "log.jsonl").write_text(json.dumps(record) + "\n")
    return run_dir


def test_a_finished_run_elsewhere_counts_only_when_it_trained_the_same(tmp_path):
    spec = SyntheticSpec(num_train=4, num_val=2, image_size=(64, 64), max_objects=3)
    here, there = (write_synthetic_dataset(tmp_path / name, spec) for name in ("here", "there"))
    recipe = variant_recipe(scaled_recipe(epochs=2), lite_dino_variants()["h3l1-2x3"])
    wanted = demo_train_config(recipe, here, "cpu")
    # the training study's way of writing the same run: the preset's own encoder and KDA decoder left implicit,
    # another data folder, evaluated after the last epoch only, another worker count
    implicit = {k: v for k, v in wanted.model_overrides.items() if k not in ("encoder", "decoder_key_aware")}
    same = dataclasses.replace(demo_train_config(recipe, there, "cpu"), model_overrides=implicit, eval_every=2, workers=1)
    assert same.model_overrides != wanted.model_overrides and same.train_images != wanted.train_images
    assert finished_run_metrics(wanted, _finished_run(tmp_path / "same", same, ap=0.4)) == {
        "AP": 0.4,
        "AP50": 0.8,
        **dict.fromkeys(("AP75", "APs", "APm", "APl")),
    }

    msda = dataclasses.replace(same, model_overrides={**implicit, "decoder_key_aware": False})
    other_data = write_synthetic_dataset(tmp_path / "other", dataclasses.replace(spec, seed=3))
    refused = {
        "lr": dataclasses.replace(same, lr=1e-3),
        "seed": dataclasses.replace(same, seed=1),
        "model": msda,
        "dataset (not written from the same synthetic spec)": demo_train_config(recipe, other_data, "cpu"),
    }
    for i, (what, config) in enumerate(refused.items()):
        with pytest.raises(ValueError, match=rf"trained other settings: {what.replace('(', '.').replace(')', '.')}$"):
            finished_run_metrics(wanted, _finished_run(tmp_path / f"refused{i}", config))
    with pytest.raises(ValueError, match="has not finished its 2 epochs"):
        finished_run_metrics(wanted, _finished_run(tmp_path / "unfinished", same, epoch=1))
    with pytest.raises(ValueError, match="not a readable litedetr training checkpoint"):
        finished_run_metrics(wanted, tmp_path / "missing")


def test_a_demo_run_under_its_time_cap_counts_unless_the_cap_cut_it(tmp_path):
    spec = SyntheticSpec(num_train=4, num_val=2, image_size=(64, 64), max_objects=3)
    data = write_synthetic_dataset(tmp_path / "data", spec)
    wanted = demo_train_config(scaled_recipe(epochs=2), data, "cpu")
    demo = dataclasses.replace(wanted, max_train_minutes=12.0)  # litedetr demo's run: the same steps unless the cap cut them
    assert finished_run_metrics(wanted, _finished_run(tmp_path / "uncut", demo, ap=0.5))["AP"] == 0.5
    cut_run = _finished_run(tmp_path / "cut", demo)
    with open(cut_run / "log.jsonl", "a") as log:
        log.write(json.dumps({"kind": "schedule", "epoch": 1, "step": 9, "epoch_batches": 3, "planned_batches": 75}) + "\n")
    with pytest.raises(ValueError, match=r"trained other settings: schedule \(epochs cut by its time cap\)$"):
        finished_run_metrics(wanted, cut_run)
