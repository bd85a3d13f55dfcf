"""The user's pipeline through the CLI: train -> eval -> predict on a generated dataset, and the
one-line errors for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import coco_box, coco_image, write_coco

from litedetr import load_model
from litedetr.cli import main
from litedetr.engine.recipes import FROM_SCRATCH, SMALL_DATA
from litedetr.engine.state import load_state, save_state
from litedetr.engine.trainer import CHECKPOINT

TRAIN = ["--model", "lite-dino-r18-tiny-h3l1-2x3", "--batch-size", "2", "--image-sizes", "64", "--max-size", "64", "--workers", "0"]


@pytest.fixture(scope="module")
def trained(tiny_synthetic, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pipeline") / "run"
    assert main(["train", *TRAIN, "--data", str(tiny_synthetic), "--epochs", "2", "--out", str(out)]) == 0
    return out


def test_train_writes_a_complete_run(trained, capsys):
    for name in ("checkpoint.pt", "model.safetensors", "train_config.json", "log.jsonl", "curves.png", "detections_val.json"):
        assert (trained / name).stat().st_size > 0, name
    records = [json.loads(line) for line in (trained / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4]
    assert [r["epoch"] for r in records if r["kind"] == "eval"] == [1, 2]


def test_eval_and_predict_use_the_trained_model(trained, tiny_synthetic, tmp_path, capsys):
    assert (
        main(["eval", "--checkpoint", str(trained / "model.safetensors"), "--data", str(tiny_synthetic), "--out", str(tmp_path / "eval"), "--workers", "0"])
        == 0
    )
    table = capsys.readouterr().out
    assert "AP50" in table and "APl" in table
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())["metrics"]
    assert set(metrics) >= {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    assert all(v is None or 0 <= v <= 1 for v in metrics.values())

    images = sorted((tiny_synthetic / "val").iterdir())
    assert main(["predict", "--checkpoint", str(trained / "model.safetensors"), *map(str, images), "--out", str(tmp_path / "pred"), "--threshold", "0"]) == 0
    predictions = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    assert len(predictions) == len(images)
    assert {d["name"] for p in predictions for d in p["detections"]} <= {"circle", "square", "triangle", "cross", "star"}
    assert all((tmp_path / "pred" / p["drawing"]).exists() for p in predictions)


def test_eval_scores_an_exported_graph_as_the_model(trained, tiny_synthetic, tmp_path, capsys):
    """``litedetr eval --backend``: the float32 graph scores what PyTorch scores; the INT8 one runs through the same path."""
    pytest.importorskip("onnxruntime")
    metrics = {}
    for name, extra in (("float32", []), ("int8", ["--int8"])):
        graph = tmp_path / f"{name}.onnx"
        assert main(["export", "--checkpoint", str(trained / "model.safetensors"), "--size", "64x64", "--out", str(graph), *extra]) == 0
        out = tmp_path / name
        assert main(["eval", "--checkpoint", str(graph), "--backend", "onnxruntime", "--data", str(tiny_synthetic), "--out", str(out), "--workers", "0"]) == 0
        metrics[name] = json.loads((out / "metrics.json").read_text())["metrics"]
    out = tmp_path / "pytorch"
    assert main(["eval", "--checkpoint", str(trained / "model.safetensors"), "--data", str(tiny_synthetic), "--out", str(out), "--workers", "0"]) == 0
    expected = json.loads((out / "metrics.json").read_text())["metrics"]
    graph_detections = json.loads((tmp_path / "float32" / "detections.json").read_text())
    model_detections = json.loads((out / "detections.json").read_text())
    assert len(graph_detections) == len(model_detections) > 0
    for image_id in {d["image_id"] for d in model_detections}:  # the same detections, up to the order of near-ties
        got, want = ([d["score"] for d in found if d["image_id"] == image_id] for found in (graph_detections, model_detections))
        assert sorted(got) == pytest.approx(sorted(want), abs=1e-4)
    assert metrics["float32"] == pytest.approx(expected, abs=1e-3)
    assert set(metrics["int8"]) == set(expected) and all(v is None or 0 <= v <= 1 for v in metrics["int8"].values())
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(tmp_path / "float32.onnx"), "--backend", "onnxruntime", "--device", "cuda", "--data", str(tiny_synthetic)]) == 2
    assert "runs an exported graph on the CPU" in capsys.readouterr().err


def test_resume_of_a_finished_run_changes_nothing_and_a_second_run_is_refused(trained, tiny_synthetic, capsys):
    before = (trained / "model.safetensors").read_bytes()
    assert main(["train", *TRAIN, "--data", str(tiny_synthetic), "--epochs", "2", "--out", str(trained), "--resume"]) == 0
    assert (trained / "model.safetensors").read_bytes() == before
    capsys.readouterr()
    assert main(["train", *TRAIN, "--data", str(tiny_synthetic), "--epochs", "2", "--out", str(trained)]) == 2
    assert "already holds a run (checkpoint.pt); pass --resume" in capsys.readouterr().err


def test_resume_with_other_settings_is_refused(trained, tiny_synthetic, capsys):
    assert main(["train", *TRAIN, "--data", str(tiny_synthetic), "--epochs", "2", "--lr", "1e-3", "--out", str(trained), "--resume"]) == 2
    assert "trained with other settings (lr)" in capsys.readouterr().err


def test_eval_with_a_model_of_another_class_count_is_one_line(trained, tmp_path, capsys):
    annotations, images = write_coco(tmp_path, [coco_image(1)], [coco_box(1, 1, 1, [1, 1, 10, 10])], [{"id": 1, "name": "only"}])
    code = main(
        ["eval", "--checkpoint", str(trained / "model.safetensors"), "--val-json", str(annotations), "--val-images", str(images), "--out", str(tmp_path / "e")]
    )
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("litedetr: error:") and "the model has 5 classes" in err and "has 1 categories" in err and "\n" not in err


def test_diverging_training_stops_with_a_clear_message(tiny_synthetic, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *TRAIN, "--data", str(tiny_synthetic), "--epochs", "2", "--lr", "1e30", "--clip-norm", "0", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "training stopped:" in err and "not finite" in err and "Lower the learning rate" in err


def test_missing_dataset_parts_are_named(tmp_path, capsys):
    assert main(["train", *TRAIN, "--data", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    assert "no annotations/instances_train*.json" in capsys.readouterr().err
    assert main(["train", *TRAIN, "--train-json", str(tmp_path / "a.json"), "--out", str(tmp_path / "r")]) == 2
    assert "--train-json and --train-images go together" in capsys.readouterr().err


def test_preset_fields_are_set_from_the_command_line(tiny_synthetic, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", *TRAIN, "--data", str(tiny_synthetic), "--epochs", "1", "--out", str(out)]
    assert main([*args, "--set", "backbone_trainable_norm=true", "dn_number=4", 'encoder={"d_ffn_low": 32}']) == 0
    config = json.loads((out / "train_config.json").read_text())["model_overrides"]
    # a run from random weights also records the from-scratch defaults, so that a resume keeps them
    assert config == {**dict(FROM_SCRATCH), "backbone_trainable_norm": True, "dn_number": 4, "encoder": {"d_ffn_low": 32}}
    model = load_model(out / "model.safetensors")
    assert model.config.backbone_trainable_norm and model.config.dn_number == 4 and model.config.encoder.d_ffn_low == 32
    capsys.readouterr()
    assert main([*args[:-1], str(tmp_path / "other"), "--set", "no_such_field=1"]) == 2
    assert "unknown DetectorConfig fields ['no_such_field']" in capsys.readouterr().err
    assert main([*args[:-1], str(tmp_path / "third"), "--set", "num_classes=3"]) == 2
    assert "model overrides ['num_classes'] come from the dataset" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (["--model", "dino-r18"], "unknown model preset 'dino-r18'; did you mean dino-r18-tiny"),
        (["--epochs", "0"], "argument --epochs: must be an integer >= 1, got 0"),
        (["--max-minutes", "0"], "argument --max-minutes: must lie in (0, inf), got 0"),
        (["--image-sizes", "16"], "image_sizes must be short sides >= 32"),
        (["--set", "no_such_field=1"], "unknown DetectorConfig fields ['no_such_field']"),
        (["--backbone-weights", "missing.pth"], "backbone weights 'missing.pth': neither 'imagenet' nor an existing file"),
    ],
)
def test_bad_arguments_fail_before_any_data_is_written(tmp_path, capsys, change, message):
    """Without --data, train would first write the synthetic dataset (minutes): a bad argument must stop it before."""
    out = tmp_path / "run"
    try:
        code = main(["train", "--model", "lite-dino-r18-tiny-h3l1-2x3", "--out", str(out), *change])
    except SystemExit as exit_info:  # refused by the argument parser itself
        code = exit_info.code
    assert code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_preset_suggestions_and_an_empty_listing(capsys):
    assert main(["train", "--model", "lite-dino-r50-h3l1-2x4", "--out", "unused"]) == 2
    err = capsys.readouterr().err
    assert "did you mean lite-dino-r50-h3l1-2x3" in err and "`litedetr models` lists them all" in err
    assert main(["models", "no-such-family"]) == 1
    assert "no preset name contains 'no-such-family'" in capsys.readouterr().err
    assert main(["models", "r18-tiny"]) == 0
    assert "lite-dino-r18-tiny-h3l1-2x3" in capsys.readouterr().out


def test_a_finished_run_is_extended_by_more_epochs(trained, tiny_synthetic, tmp_path):
    """--epochs may grow on resume; the learning-rate drop stays the run's own (not re-derived from --epochs)."""
    import shutil

    out = tmp_path / "extended"
    shutil.copytree(trained, out)
    assert main(["train", *TRAIN, "--data", str(tiny_synthetic), "--epochs", "3", "--out", str(out), "--resume"]) == 0
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if '"train"' in line]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert records[-1]["lr"] == pytest.approx(records[0]["lr"] * 0.1)  # dropped after epoch 1, as the 2-epoch run set
    assert json.loads((out / "train_config.json").read_text())["epochs"] == 3


def test_the_model_file_keeps_the_datasets_category_ids(trained, tiny_synthetic):
    from litedetr.data import CocoDetection, find_split

    split = find_split(tiny_synthetic, "train")
    dataset = CocoDetection(split.annotations, split.images)
    config = load_model(trained / "model.safetensors").config
    assert config.category_ids == dataset.category_ids and config.class_names == dataset.class_names


def test_the_built_in_dataset_is_chosen_with_synthetic(tmp_path, monkeypatch, tiny_synthetic):
    import argparse

    from litedetr.tools import train

    written = []
    monkeypatch.setattr(train, "write_synthetic_dataset", lambda root, spec: written.append((root, spec.kind)) or tiny_synthetic)
    for kind, folder in (("glyphs", "synthetic-data-glyphs"), ("shapes", "synthetic-data")):
        args = argparse.Namespace(data=None, synthetic=kind, train_json=None, train_images=None)
        with pytest.raises(ValueError, match=folder):  # nothing written there by the stand-in: the split is looked for in the kind's own folder
            train.resolve_data(args, "train", tmp_path / "synthetic-data")
        assert written[-1] == (tmp_path / folder, kind)


def test_eval_scores_a_coco_model_by_category_id(tmp_path, capsys):
    """A converted COCO checkpoint (91 rows = COCO ids) on a dataset of 2 COCO categories: scored by id (issue 25 item 3)."""
    from litedetr.engine.evaluate import coco_metrics
    from litedetr.weights import build_model, save_model
    from litedetr.weights.classes import coco_class_names

    model = build_model("dino-r18-tiny", min_size=(64,), max_size=64, class_names=coco_class_names(), category_ids=tuple(range(91)))
    save_model(model, tmp_path / "coco.safetensors")
    boxes = [coco_box(1, 1, 18, [4, 4, 30, 30]), coco_box(2, 1, 1, [20, 10, 25, 25])]
    annotations, images = write_coco(tmp_path, [coco_image(1)], boxes, [{"id": 18, "name": "dog"}, {"id": 1, "name": "person"}])
    out = tmp_path / "e"
    assert (
        main(
            [
                "eval",
                "--checkpoint",
                str(tmp_path / "coco.safetensors"),
                "--val-json",
                str(annotations),
                "--val-images",
                str(images),
                "--out",
                str(out),
                "--workers",
                "0",
            ]
        )
        == 0
    )
    detections = json.loads((out / "detections.json").read_text())
    assert detections and {d["category_id"] for d in detections} <= set(range(91))
    assert json.loads((out / "metrics.json").read_text())["metrics"] == coco_metrics(annotations, detections)
    capsys.readouterr()
    renamed = [{"id": 18, "name": "cat"}, {"id": 1, "name": "person"}]  # id 18 is the model's dog: not the same class
    annotations, images = write_coco(tmp_path / "other", [coco_image(1)], boxes, renamed)
    assert (
        main(["eval", "--checkpoint", str(tmp_path / "coco.safetensors"), "--val-json", str(annotations), "--val-images", str(images), "--out", str(out)]) == 2
    )
    assert "the model has 91 classes" in capsys.readouterr().err


def test_small_data_applies_the_demos_recipe_under_explicit_flags(trained, tiny_synthetic, tmp_path, capsys):
    args = ["train", *TRAIN, "--data", str(tiny_synthetic), "--epochs", "1", "--small-data"]
    # from scratch: every change of SMALL_DATA; --set and --lr-backbone win (64-px images have fewer than 200 tokens)
    assert main([*args, "--out", str(tmp_path / "scratch"), "--set", "num_queries=40", "num_select=40", "--lr-backbone", "1e-4"]) == 0
    config = json.loads((tmp_path / "scratch" / "train_config.json").read_text())
    assert config["model_overrides"] == {**SMALL_DATA.model_overrides(), "num_queries": 40, "num_select": 40}
    assert config["model_overrides"]["learned_query_content"] is False and config["model_overrides"]["backbone_trainable_norm"] is True
    assert (config["lr"], config["lr_backbone"]) == (4e-4, 1e-4)
    model = load_model(tmp_path / "scratch" / "model.safetensors")
    assert (model.config.dn_number, model.config.class_loss_weight, model.config.num_queries, model.config.learned_query_content) == (100, 8.0, 40, False)
    # from a trained detector: only the losses' and training queries' changes, so its weights still load, and the
    # layout the model file was trained with (its KDA query logits, from scratch)
    assert main([*args, "--out", str(tmp_path / "init"), "--init", str(trained / "model.safetensors")]) == 0
    config = json.loads((tmp_path / "init" / "train_config.json").read_text())
    assert config["model_overrides"] == {"dn_number": 100, "encoder_one_to_many": 6, "class_loss_weight": 8.0, "kda_query_logits": True}
    assert load_model(tmp_path / "init" / "model.safetensors").config.kda_query_logits
    assert (config["lr"], config["lr_backbone"]) == (SMALL_DATA.lr, SMALL_DATA.backbone_lr) == (4e-4, 1e-3)
    # without the flag (the module's run): DINO's learning rates and the preset, KDA starting uniform
    config = json.loads((trained / "train_config.json").read_text())
    assert (
        (config["model_overrides"], config["lr"], config["lr_backbone"])
        == (dict(FROM_SCRATCH), 1e-4, 1e-5)
        == ({"kda_zero_query": True, "kda_query_logits": True}, 1e-4, 1e-5)
    )


def test_kda_starts_uniform_with_query_logits_from_scratch_unless_set_and_a_resume_keeps_the_runs_start(trained, tiny_synthetic, tmp_path):
    config = load_model(trained / "model.safetensors").config  # the module's run, from scratch
    assert config.kda_zero_query and config.kda_query_logits
    args = ["train", *TRAIN, "--data", str(tiny_synthetic), "--epochs", "1", "--out", str(tmp_path / "authors")]
    assert main([*args, "--set", "kda_zero_query=false", "kda_query_logits=false"]) == 0
    overrides = json.loads((tmp_path / "authors" / "train_config.json").read_text())["model_overrides"]
    assert overrides == {"kda_zero_query": False, "kda_query_logits": False}
    # resumed without the --set: the run's own start, not today's default (which would refuse the resume)
    assert main([*args[:-4], "--epochs", "2", "--out", str(tmp_path / "authors"), "--resume"]) == 0
    config = load_model(tmp_path / "authors" / "model.safetensors").config
    assert config.kda_zero_query is False and config.kda_query_logits is False
    # --init from it: the file's layout, without the query logits
    assert main([*args[:-4], "--out", str(tmp_path / "from-authors"), "--init", str(tmp_path / "authors" / "model.safetensors")]) == 0
    assert json.loads((tmp_path / "from-authors" / "train_config.json").read_text())["model_overrides"] == {}


def test_a_small_data_run_from_before_the_kda_options_resumes_with_its_own_start(tiny_synthetic, tmp_path):
    out = tmp_path / "run"
    args = ["train", *TRAIN, "--data", str(tiny_synthetic), "--small-data", "--out", str(out), "--set", "num_queries=40", "num_select=40"]
    assert main([*args, "kda_zero_query=false", "kda_query_logits=false", "--epochs", "1"]) == 0
    state = load_state(out / CHECKPOINT)  # as a run written before the options existed: no such fields
    config = json.loads(state["train_config"])
    del config["model_overrides"]["kda_zero_query"], config["model_overrides"]["kda_query_logits"]
    save_state(out / CHECKPOINT, {**state, "train_config": json.dumps(config)})
    assert main([*args, "--epochs", "2", "--resume"]) == 0
    config = load_model(out / "model.safetensors").config
    assert config.kda_zero_query is False and config.kda_query_logits is False


def test_max_minutes_cuts_the_epochs_after_the_first_and_says_so(tiny_synthetic, tmp_path, caplog):
    out = tmp_path / "capped"
    with caplog.at_level("WARNING", logger="litedetr.engine.trainer"):
        assert main(["train", *TRAIN, "--data", str(tiny_synthetic), "--epochs", "3", "--max-minutes", "1e-6", "--out", str(out)]) == 0
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if r["kind"] == "train"] == [0, 0, 1, 2]  # 2 batches, then 1 in each epoch left
    assert [(r["epoch"], r["epoch_batches"], r["planned_batches"]) for r in records if r["kind"] == "schedule"] == [(1, 1, 2)]
    assert "the 2 epochs left are cut to 1 of 2 batches each" in caplog.text
    assert json.loads((out / "train_config.json").read_text())["max_train_minutes"] == 1e-6
