"""Fine-tuning: a run that starts from a trained checkpoint (``init``), optionally with a frozen backbone,
and the command line's checks of ``--init``."""

from __future__ import annotations

import json

import pytest
import torch
from test_epoch_batches import EXACT_RERUNS

from litedetr.cli import main
from litedetr.data import find_split
from litedetr.engine import TrainConfig, Trainer
from litedetr.weights import build_model, save_model

PRESET = "dino-r18-tiny"
OVERRIDES = {"backbone_trainable_norm": True, "dn_number": 4}
SOURCE_CLASSES = ("Star", "unicorn", "circle")
"""The checkpoint's classes: two of the synthetic dataset's five (circle, square, triangle, cross, star) and one it lacks."""


def config(data, **changes) -> TrainConfig:
    train = find_split(data, "train")
    settings = dict(
        model=PRESET, train_annotations=str(train.annotations), train_images=str(train.images), model_overrides=OVERRIDES, epochs=1,
        epoch_batches=2, batch_size=1, lr=1e-3, lr_backbone=1e-3, image_sizes=(64,), max_size=64, workers=0, seed=3,
    )  # fmt: skip
    return TrainConfig(**{**settings, **changes})


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    model = build_model(PRESET, num_classes=3, class_names=SOURCE_CLASSES, **OVERRIDES)
    path = tmp_path_factory.mktemp("source") / "source.safetensors"
    save_model(model, path)
    return model.state_dict(), path


def test_a_run_starts_from_the_checkpoint_with_a_fresh_optimiser(tiny_synthetic, tmp_path, source):
    weights, path = source
    trainer = Trainer(config(tiny_synthetic, init=str(path)), tmp_path / "run")
    names = trainer.model.config.class_names
    assert names == ("circle", "square", "triangle", "cross", "star")
    start = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    assert torch.equal(start["heads.class_heads.0.weight"][[0, 4]], weights["heads.class_heads.0.weight"][[2, 0]])
    assert all(torch.equal(v, weights[k]) for k, v in start.items() if "class_head" not in k and "label_embed" not in k)
    assert trainer.step == 0 and not trainer.optimizer.state and all(g["lr"] == g["initial_lr"] for g in trainer.optimizer.param_groups)
    trainer.fit()
    assert not torch.equal(trainer.model.state_dict()["heads.class_heads.0.weight"], start["heads.class_heads.0.weight"])


def test_a_frozen_backbone_keeps_its_weights_and_statistics(tiny_synthetic, tmp_path, source):
    _, path = source
    trainer = Trainer(config(tiny_synthetic, init=str(path), freeze_backbone=True), tmp_path / "run")
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    assert all(not p.requires_grad for p in trainer.model.backbone.parameters())
    assert "backbone" not in [g["name"] for g in trainer.optimizer.param_groups]
    trainer.fit()
    after = trainer.model.state_dict()
    backbone = [k for k in after if k.startswith("backbone.")]
    assert any("running_mean" in k for k in backbone)  # trainable batch norm: its statistics would move in training mode
    assert all(torch.equal(after[k], before[k]) for k in backbone)
    assert not torch.equal(after["encoder.layers.0.ffn.linear1.weight"], before["encoder.layers.0.ffn.linear1.weight"])


def test_a_resume_does_not_read_the_init_checkpoint_again(tiny_synthetic, tmp_path, source):
    _, path = source
    first = Trainer(config(tiny_synthetic, init=str(path), epochs=1), tmp_path / "run")
    first.fit()
    resumed = Trainer(config(tiny_synthetic, init=str(tmp_path / "gone.safetensors"), epochs=2), tmp_path / "run", resume=True)
    assert resumed.fit().epochs_done == 2
    # the resumed run continues from its own checkpoint: it ends where a straight two-epoch run from the same init does
    straight = Trainer(config(tiny_synthetic, init=str(path), epochs=2), tmp_path / "straight")
    assert straight.fit().epochs_done == 2
    tolerance = dict(rtol=0, atol=0) if EXACT_RERUNS else {}
    resumed_state = resumed.model.state_dict()
    for name, value in straight.model.state_dict().items():
        torch.testing.assert_close(resumed_state[name], value, **tolerance, msg=name)


def test_init_is_checked_before_any_work(tmp_path, capsys, source):
    _, path = source
    args = ["train", "--model", "deformable-detr-r18-tiny", "--out", str(tmp_path / "run"), "--workers", "0"]
    assert main([*args, "--init", str(tmp_path / "missing.pth")]) == 2
    assert "missing.pth: no such checkpoint file" in capsys.readouterr().err
    assert main([*args, "--init", str(path)]) == 2
    err = capsys.readouterr().err
    assert "is a dino checkpoint; --model deformable-detr-r18-tiny is of the deformable-detr family" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "run" / "synthetic-data").exists()
    assert main([*args, "--init", str(path), "--backbone-weights", "imagenet"]) == 2
    assert "exclude each other" in capsys.readouterr().err


def test_train_command_with_init_logs_the_classes_carried_over(tiny_synthetic, tmp_path, capsys, source):
    _, path = source
    args = ["train", "--model", PRESET, "--data", str(tiny_synthetic), "--epochs", "1", "--batch-size", "2", "--image-sizes", "64"]
    args += ["--max-size", "64", "--workers", "0", "--set", "backbone_trainable_norm=true", "dn_number=4", "--out", str(tmp_path / "run")]
    assert main([*args, "--init", str(path), "--freeze-backbone"]) == 0
    err = capsys.readouterr().err
    assert "2 of 5 classes carried over (circle, star); new: square, triangle, cross" in err
    saved = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert saved["init"] == str(path) and saved["freeze_backbone"] is True
