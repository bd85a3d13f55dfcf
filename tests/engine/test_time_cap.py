"""``TrainConfig.max_train_minutes``: the first epoch trains whole, then the epochs left are cut to what
fits the time left, from measured batch times, and given batches back (up to the planned ones) when a
later epoch ran faster; each change is logged and kept on resume."""

from __future__ import annotations

import json

import pytest
import torch

from litedetr.data import find_split
from litedetr.engine import TrainConfig, Trainer

EXACT_RERUNS = torch.backends.cpu.get_cpu_capability() != "AVX512"
"""Bit-identical reruns only on AVX2 CPUs (see ``test_epoch_batches.py``)."""


def config(data, **changes) -> TrainConfig:
    train = find_split(data, "train")
    settings = dict(
        model="deformable-detr-r18-tiny", train_annotations=str(train.annotations), train_images=str(train.images), epochs=3,
        batch_size=1, lr=1e-4, lr_backbone=1e-4, lr_drop=(2,), image_sizes=(64,), max_size=64, workers=0, seed=3, deterministic=True,
    )  # fmt: skip
    return TrainConfig(**{**settings, **changes})


def records(run, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if r["kind"] == kind]


def test_a_cap_that_fits_changes_nothing(tiny_synthetic, tmp_path):
    capped = Trainer(config(tiny_synthetic, max_train_minutes=60.0), tmp_path / "capped")
    assert capped.fit().steps == 12 and capped.epoch_batches == capped.planned_batches == 4
    assert records(tmp_path / "capped", "schedule") == []
    assert 0 < capped.train_seconds < 3600
    if EXACT_RERUNS:
        uncapped = Trainer(config(tiny_synthetic), tmp_path / "uncapped")
        uncapped.fit()
        for name, value in uncapped.model.state_dict().items():
            torch.testing.assert_close(capped.model.state_dict()[name], value, rtol=0, atol=0, msg=name)


def test_a_cap_already_spent_cuts_every_later_epoch_to_one_step_and_logs_it(tiny_synthetic, tmp_path):
    trainer = Trainer(config(tiny_synthetic, max_train_minutes=1e-6), tmp_path / "run")
    assert trainer.total_steps == 12
    assert trainer.fit().steps == 6  # 4 in the first epoch, then 1 in each of the two left
    assert [r["epoch"] for r in records(tmp_path / "run", "train")] == [0, 0, 0, 0, 1, 2]
    (cut,) = records(tmp_path / "run", "schedule")
    assert (cut["epoch"], cut["step"], cut["epoch_batches"], cut["planned_batches"], cut["cap_minutes"]) == (1, 4, 1, 4, 1e-6)
    assert cut["batch_seconds"] > 0 and cut["trained_seconds"] > 0
    assert trainer.total_steps == 6
    assert [r["lr"] for r in records(tmp_path / "run", "train")] == pytest.approx([1e-4] * 5 + [1e-5])  # the drop stays at epoch 2


def test_the_cut_fits_the_time_left_at_the_median_batch_time(tiny_synthetic, tmp_path):
    trainer = Trainer(config(tiny_synthetic, epochs=4, max_train_minutes=1.0, accumulate=2, epoch_batches=4), tmp_path / "run")
    (tmp_path / "run").mkdir()
    trainer.epoch, trainer.step = 1, 2
    trainer.train_seconds, trainer._batch_seconds = 36.0, [1.0, 9.0, 2.0, 1.5]  # median 1.75 s; mean 3.4 s
    trainer._fit_time_cap()  # 24 s left for 3 epochs: 4.57 batches each at the median (2.4 at the mean) -> 4, no cut
    assert trainer.epoch_batches == 4 and trainer.total_steps == 8
    trainer.train_seconds = 45.0  # 15 s left: 2.86 batches each -> 2 (a multiple of accumulate)
    trainer._fit_time_cap()
    assert trainer.epoch_batches == 2 and trainer.total_steps == 2 + 3 * 1
    trainer.train_seconds, trainer._batch_seconds = 40.0, [1.0, 1.0, 1.0, 1.0]  # a faster epoch: 20 s left, 6.7 batches each -> back to 4
    trainer._fit_time_cap()
    assert trainer.epoch_batches == 4 and trainer.total_steps == 8
    trainer.train_seconds = 0.0  # plenty of time: never more than the planned batches
    trainer._fit_time_cap()
    assert trainer.epoch_batches == 4
    trainer.train_seconds = 120.0  # over the cap: still one accumulation's worth per epoch
    trainer._fit_time_cap()
    assert trainer.epoch_batches == 2 and trainer.total_steps == 2 + 3 * 1
    changes = [(r["previous_batches"], r["epoch_batches"], r["planned_batches"], r["batch_seconds"]) for r in records(tmp_path / "run", "schedule")]
    assert changes == [(4, 2, 4, 1.75), (2, 4, 4, 1.0), (4, 2, 4, 1.0)]


def test_a_resumed_run_keeps_its_cut_and_its_time_and_equals_a_straight_run(tiny_synthetic, tmp_path):
    straight = Trainer(config(tiny_synthetic, max_train_minutes=1e-6), tmp_path / "straight")
    straight.fit()
    first = Trainer(config(tiny_synthetic, epochs=2, max_train_minutes=1e-6), tmp_path / "resumed")
    assert first.fit().steps == 5 and first.epoch_batches == 1
    resumed = Trainer(config(tiny_synthetic, max_train_minutes=1e-6), tmp_path / "resumed", resume=True)  # epochs 2 -> 3
    assert resumed.epoch_batches == 1 and resumed.train_seconds == first.train_seconds and resumed.total_steps == 6
    assert resumed.fit().steps == 6
    assert [r["epoch"] for r in records(tmp_path / "resumed", "train")] == [0, 0, 0, 0, 1, 2]
    if not EXACT_RERUNS:
        pytest.skip("this CPU's training reruns are not bit-identical (AVX-512); the weights are compared on AVX2")
    for name, value in straight.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[name], value, rtol=0, atol=0, msg=name)


def test_the_cap_must_be_positive(tiny_synthetic):
    with pytest.raises(ValueError, match="max_train_minutes"):
        config(tiny_synthetic, max_train_minutes=0.0)


def test_batches_that_fit_and_the_schedule_length_by_hand():
    from litedetr.engine.time_cap import batches_that_fit, schedule_length

    assert batches_that_fit(1.0, 45.0, 1.75, 3, 2) == 2  # 15 s left: 2.86 batches per epoch, down to a multiple of 2
    assert batches_that_fit(1.0, 45.0, 1.75, 3, 1) == 2
    assert batches_that_fit(1.0, 30.0, 1.0, 2, 1) == 15
    assert batches_that_fit(1.0, 120.0, 1.0, 2, 4) == 4  # over the cap: one accumulation
    assert schedule_length(0, 0, 0, 12, 75, 1) == 900
    assert schedule_length(2, 1, 0, 4, 2, 2) == 2 + 3 * 1
    assert schedule_length(5, 1, 3, 3, 4, 2) == 5 + 1 + 1 * 2  # mid-epoch: 1 batch of this epoch left, then one epoch of 2 steps
    assert schedule_length(7, 3, 0, 3, 4, 2) == 7  # finished


def test_the_cpu_kernels_are_built_before_the_clock_starts(tiny_synthetic, tmp_path, monkeypatch):
    from litedetr.engine import trainer as trainer_module

    trainer = Trainer(config(tiny_synthetic, epochs=1), tmp_path / "run")
    seen = []
    monkeypatch.setattr(trainer_module.cpu_kernels, "prepare", lambda: seen.append((trainer.step, trainer.train_seconds)) or True)
    trainer.fit()
    assert seen == [(0, 0.0)] and trainer.step == 4 and trainer.train_seconds > 0
