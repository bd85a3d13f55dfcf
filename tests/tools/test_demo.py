"""`litedetr demo` end to end on a shrunken recipe: every promised file and a complete summary."""

from __future__ import annotations

import dataclasses
import json

import torch

from litedetr.data import SyntheticSpec, write_synthetic_dataset
from litedetr.engine import Trainer
from litedetr.tools.demo import DemoRecipe, demo_train_config, run_demo
from litedetr.weights import load_model

SMALL_IMAGE_QUERIES = tuple({**dict(DemoRecipe.model_overrides), "num_queries": 40, "num_select": 40}.items())
"""The demo's model with fewer queries than a 64-px image's 85 encoder tokens."""
TINY = DemoRecipe(
    model_overrides=SMALL_IMAGE_QUERIES, data=SyntheticSpec(num_train=4, num_val=2, image_size=(80, 80), max_objects=4), image_size=64, epochs=1,
    lr_drop=(1,), workers=0, predicted_images=2,
)  # fmt: skip


def test_demo_writes_summary_predictions_and_resumes_as_a_report(tmp_path):
    summary = run_demo(tmp_path, TINY)
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written == json.loads(json.dumps(summary))
    assert set(summary["metrics"]) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    assert all(v is None or 0 <= v <= 1 for v in summary["metrics"].values())
    gflops = summary["encoder_gflops"]
    assert 0 < gflops["lite_encoder"] < gflops["standard_encoder"] and gflops["ratio"] == gflops["lite_encoder"] / gflops["standard_encoder"]
    for key in ("model", "checkpoint", "log", "curves", "detections"):
        assert (tmp_path / summary["files"][key]).relative_to(tmp_path).parts[0] == "run" and (tmp_path / summary["files"][key]).exists()
    predictions = json.loads((tmp_path / "predictions" / "predictions.json").read_text())
    assert len(predictions) == 2 and all((tmp_path / "predictions" / p["drawing"]).exists() for p in predictions)
    assert summary["train_steps"] == 1 and summary["seed"] == TINY.seed
    drawn = summary["predictions"]
    assert drawn["images"] == 2 and drawn["images_below_threshold"] == sum(1 for p in predictions if p.get("below_threshold"))
    assert all(p["detections"] for p in predictions)  # a detector that finds nothing above 0.3 still shows its best guesses

    again = run_demo(tmp_path, TINY)  # a finished run is reported again, not retrained
    assert again["train_steps"] == 1 and again["metrics"] == summary["metrics"]


def test_summary_names_the_precision_and_the_schedule(tmp_path):
    summary = run_demo(tmp_path, TINY)
    assert summary["precision"] in ("bf16", "float32") and summary["precision_reason"].startswith(("bf16", "float32"))
    schedule = summary["schedule"]
    assert schedule["batches_per_epoch"] == [1] and schedule["full_batches_per_epoch"] == schedule["planned_batches"] == 1
    assert not schedule["cut"] and schedule["cuts"] == [] and schedule["budget_minutes"] == TINY.train_minutes and schedule["train_seconds"] > 0


def test_a_tight_budget_cuts_the_epochs_after_the_first_and_a_rerun_keeps_the_schedule(tmp_path):
    recipe = dataclasses.replace(TINY, data=SyntheticSpec(num_train=8, num_val=2, image_size=(80, 80), max_objects=4), batch_size=2, epochs=3,
                                 lr_drop=(2,), train_minutes=1e-6)  # fmt: skip
    summary = run_demo(tmp_path, recipe)
    schedule = summary["schedule"]
    assert schedule["batches_per_epoch"] == [4, 1, 1] and schedule["full_batches_per_epoch"] == schedule["planned_batches"] == 4
    assert schedule["cut"] and [(c["epoch"], c["epoch_batches"]) for c in schedule["cuts"]] == [(1, 1)]
    assert summary["train_steps"] == 6
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log if r["kind"] == "eval"] == [1, 2, 3]  # an evaluation after every epoch, for the curves
    again = run_demo(tmp_path, dataclasses.replace(recipe, train_minutes=60.0))  # a finished run: same schedule, nothing retrained
    assert {k: v for k, v in again["schedule"].items() if k != "budget_minutes"} == {k: v for k, v in schedule.items() if k != "budget_minutes"}
    assert again["train_steps"] == 6


def test_the_schedule_is_fixed_and_a_cap_that_fits_changes_nothing(tmp_path):
    """The recipe's batches per epoch on every machine; a cap that fits gives the same detector as none."""
    recipe = dataclasses.replace(TINY, data=SyntheticSpec(num_train=8, num_val=2, image_size=(80, 80), max_objects=4), batch_size=2, epochs=2,
                                 epoch_batches=3, lr_drop=(1,), eval_every=2)  # fmt: skip
    uncapped = run_demo(tmp_path / "uncapped", dataclasses.replace(recipe, train_minutes=None))
    assert uncapped["train_steps"] == 6
    assert {k: uncapped["schedule"][k] for k in ("batches_per_epoch", "planned_batches", "full_batches_per_epoch", "cut")} == {
        "batches_per_epoch": [3, 3], "planned_batches": 3, "full_batches_per_epoch": 4, "cut": False}  # fmt: skip
    capped = run_demo(tmp_path / "capped", dataclasses.replace(recipe, train_minutes=60.0))
    assert capped["train_steps"] == 6 and not capped["schedule"]["cut"]
    assert capped["metrics"] == uncapped["metrics"]  # same steps, same seed: the same detector whatever the machine's speed


def test_a_run_from_before_the_in_training_cap_resumes_with_the_schedule_it_kept(tmp_path):
    """Such a run chose the batches per epoch before training and kept them in ``schedule.json``."""
    recipe = dataclasses.replace(TINY, data=SyntheticSpec(num_train=8, num_val=2, image_size=(80, 80), max_objects=4), batch_size=2, epochs=2,
                                 lr_drop=(1,), train_minutes=None)  # fmt: skip
    config = dataclasses.replace(demo_train_config(recipe, write_synthetic_dataset(tmp_path / "data", recipe.data), "cpu"), epoch_batches=2, epochs=1)
    Trainer(config, tmp_path / "run").fit()  # stopped after its first epoch
    (tmp_path / "schedule.json").write_text(json.dumps({"budget_minutes": 12.0, "planned_batches": 4, "cut": True, "epoch_batches": 2}))
    summary = run_demo(tmp_path, recipe)
    assert summary["train_steps"] == 4 and summary["schedule"]["batches_per_epoch"] == [2, 2]


def test_seed_changes_the_training_run_not_the_data(tmp_path):
    one = run_demo(tmp_path / "a", dataclasses.replace(TINY, seed=1))
    two = run_demo(tmp_path / "b", dataclasses.replace(TINY, seed=2))
    assert (one["seed"], two["seed"]) == (1, 2)
    data_a, data_b = (tmp_path / d / "data" / "annotations" / "instances_train.json" for d in ("a", "b"))
    assert data_a.read_text() == data_b.read_text()
    weights = [load_model(tmp_path / d / "run" / "model.safetensors").state_dict() for d in ("a", "b")]
    assert not torch.equal(weights[0]["heads.class_heads.0.weight"], weights[1]["heads.class_heads.0.weight"])
