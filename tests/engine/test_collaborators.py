"""The Trainer's collaborators: a model, datasets and an optimiser given instead of built, one step
outside the schedule, evaluation without validation data, and the run log's reader."""

from __future__ import annotations

import pytest
import torch
from test_epoch_batches import EXACT_RERUNS, config

from litedetr.engine import Trainer
from litedetr.engine.optim import lr_factor
from litedetr.engine.run_log import read_log
from litedetr.engine.setup import build_datasets, build_run_model
from litedetr.weights import build_model


def test_a_given_model_and_datasets_train_as_the_built_ones(tiny_synthetic, tmp_path):
    cfg = config(tiny_synthetic)
    built = Trainer(cfg, tmp_path / "built")
    built.fit()
    torch.manual_seed(cfg.seed)  # the model's initial draw, as the Trainer seeds it
    datasets = build_datasets(cfg)
    model = build_run_model(cfg, datasets[0], resume=False)
    given = Trainer(cfg, tmp_path / "given", model=model, datasets=datasets)
    assert given.model is model and given.train_set is datasets[0]
    given.fit()
    assert [r["loss"] for r in read_log(tmp_path / "given", "train")] == pytest.approx([r["loss"] for r in read_log(tmp_path / "built", "train")])
    if EXACT_RERUNS:
        for name, value in built.model.state_dict().items():
            torch.testing.assert_close(model.state_dict()[name], value, rtol=0, atol=0, msg=name)


def test_a_given_model_must_have_the_training_set_classes(tiny_synthetic, tmp_path):
    cfg = config(tiny_synthetic)
    datasets = build_datasets(cfg)
    wrong = build_model(cfg.model, num_classes=datasets[0].num_classes + 2)
    with pytest.raises(ValueError, match=f"the model has {datasets[0].num_classes + 2} classes, the training set {datasets[0].num_classes}"):
        Trainer(cfg, tmp_path / "run", model=wrong, datasets=datasets)


def test_a_step_outside_the_schedule_trains_and_records_nothing(tiny_synthetic, tmp_path):
    trainer = Trainer(config(tiny_synthetic), tmp_path / "run")
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    batches = trainer.train_batches()
    first = next(batches)
    loss = trainer.train_step(*first)
    assert torch.isfinite(loss) and loss > 0
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    assert (trainer.step, trainer.history) == (0, [])
    assert not (tmp_path / "run").exists()
    # the stream goes on past the first epoch's batches (2 images, batch 1 -> 2 batches)
    rest = [next(batches) for _ in range(3)]
    assert [len(images) for images, _ in rest] == [1, 1, 1]


def test_evaluate_without_validation_data_is_one_line(tiny_synthetic, tmp_path):
    trainer = Trainer(config(tiny_synthetic), tmp_path / "run")
    with pytest.raises(ValueError, match="^no validation data: set val_annotations and val_images to evaluate$"):
        trainer.evaluate()


def test_read_log_reads_every_kind_or_one(tmp_path):
    assert read_log(tmp_path) == []
    (tmp_path / "log.jsonl").write_text(
        '{"kind": "train", "epoch": 0, "step": 1, "loss": 2.0}\n{"kind": "eval", "epoch": 1, "step": 1, "AP": 0.5}\n'
        '{"kind": "train", "epoch": 1, "step": 2, "loss": 1.5}\n'
    )
    assert [r["step"] for r in read_log(tmp_path)] == [1, 1, 2]
    assert [r["loss"] for r in read_log(tmp_path, "train")] == [2.0, 1.5]
    assert read_log(tmp_path, "eval") == [{"kind": "eval", "epoch": 1, "step": 1, "AP": 0.5}]


def test_a_given_optimizer_is_the_one_that_steps_on_the_schedule(tiny_synthetic, tmp_path):
    cfg = config(tiny_synthetic)
    datasets = build_datasets(cfg)
    model = build_run_model(cfg, datasets[0], resume=False)
    sgd = torch.optim.SGD([{"params": model.parameters(), "lr": 0.01, "momentum": 0.9}])
    trainer = Trainer(cfg, tmp_path / "run", model=model, datasets=datasets, optimizer=sgd)
    assert trainer.optimizer is sgd and sgd.param_groups[0]["initial_lr"] == 0.01 and sgd.param_groups[0]["name"] == "group0"
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer.fit()
    trained = [p for p in model.parameters() if p.requires_grad]
    assert all("momentum_buffer" in sgd.state[p] for p in trained), "SGD's state, not AdamW's"
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    records = read_log(tmp_path / "run", "train")
    assert [r["lr"] for r in records] == pytest.approx([0.01 * lr_factor(cfg, r["step"] - 1, r["epoch"], trainer.total_steps) for r in records])
    assert [r["lr"] for r in records] == pytest.approx([0.01, 0.01, 0.001, 0.001]) and set(records[0]["lr_groups"]) == {"group0"}


def test_an_optimizer_over_another_model_or_without_its_model_is_refused(tiny_synthetic, tmp_path):
    cfg = config(tiny_synthetic)
    datasets = build_datasets(cfg)
    model = build_run_model(cfg, datasets[0], resume=False)
    other = torch.optim.SGD(build_model(cfg.model, num_classes=datasets[0].num_classes).parameters(), lr=0.1)
    with pytest.raises(ValueError, match="the optimizer updates .* tensors that are not the model's parameters"):
        Trainer(cfg, tmp_path / "a", model=model, datasets=datasets, optimizer=other)
    with pytest.raises(ValueError, match="pass that model too"):
        Trainer(cfg, tmp_path / "b", datasets=datasets, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
