"""benchmarks/train_step.py: one run of the demo suite (one timed step, float32) and what its JSON says."""

from __future__ import annotations

import json
import sys

import pytest
from conftest import benchmark_script


@pytest.fixture(scope="module")
def train_step():
    with benchmark_script("train_step") as module:
        yield module


def test_demo_suite_times_steps_and_encoders_and_their_ratios(train_step, tmp_path, monkeypatch):
    monkeypatch.setattr(
        sys, "argv", ["train_step.py", "--steps", "1", "--batch-size", "1", "--precisions", "float32", "--threads", "1", "--out", str(tmp_path)]
    )
    train_step.main()
    result = json.loads((tmp_path / "train_step.json").read_text())
    steps, encoders = result["median_step_s"]["float32"], result["median_encoder_s"]["float32"]
    assert set(steps) == set(encoders) == {"dino", "lite-kda-ql", "lite-kda", "lite-msda"}
    for name, step in steps.items():
        assert 0 < encoders[name] < step, f"{name}: the encoder's forward and backward are part of a step"
        assert result["over_dino"]["float32"][name] == pytest.approx(step / steps["dino"])
        assert result["encoder_over_dino"]["float32"][name] == pytest.approx(encoders[name] / encoders["dino"])
        assert result["step_without_encoder_over_dino"]["float32"][name] == pytest.approx((step - encoders[name]) / steps["dino"])
    assert result["kda_over_msda"]["float32"] == pytest.approx(steps["lite-kda"] / steps["lite-msda"])
