"""benchmarks/peers.py: every (model, backend) call runs the same detector, and what cannot run is reported, not raised."""

from __future__ import annotations

import importlib
import json
import sys

import numpy as np
import pytest
import torch
from conftest import benchmark_script


@pytest.fixture(scope="module")
def peers():
    with benchmark_script("peers") as module:
        yield module


def test_each_backend_runs_our_detector_and_agrees(peers, tmp_path):
    calls = peers.build_calls("lite-dino-r18-tiny-h3l1-2x3", ("pytorch", "onnxruntime", "openvino", "onnxruntime-int8"), (64, 64), 1, tmp_path)
    assert all(callable(call) for call in calls.values()), calls
    ort_boxes, ort_scores, _ = calls["onnxruntime"]()
    _, int8_scores, _ = calls["onnxruntime-int8"]()  # the INT8 graph: near the float32 one, not equal
    assert 0 < np.median(np.abs(np.sort(int8_scores) - np.sort(ort_scores))) < 0.03
    ov = calls["openvino"]()
    ov_boxes, ov_scores = ov[peers_output(ov, "boxes")], ov[peers_output(ov, "scores")]
    np.testing.assert_allclose(ov_scores, ort_scores, atol=1e-4)
    for box, score in zip(ov_boxes[0], ov_scores[0]):  # detections of (near-)equal scores may come in either order
        same_score = np.abs(ort_scores[0] - score) < 1e-4
        assert np.abs(ort_boxes[0][same_score] - box).max(-1).min() < 1e-2, (box, score)
    (found,) = calls["pytorch"]()  # the same image, given in [0, 1]
    torch.testing.assert_close(found["scores"], torch.from_numpy(ort_scores[0][: len(found["scores"])]), atol=1e-4, rtol=0)


def peers_output(outputs, name: str):
    return next(key for key in outputs if name in key.get_names())


def test_a_model_that_cannot_be_built_is_reported_with_its_reason(peers, tmp_path, monkeypatch):
    real_import = importlib.import_module

    def without_transformers(name, *args):
        if name == "transformers":
            raise ImportError("No module named 'transformers'")
        return real_import(name, *args)

    monkeypatch.setattr(importlib, "import_module", without_transformers)
    calls = peers.build_calls("rtdetr-r50vd", ("pytorch", "onnxruntime"), (64, 64), 1, tmp_path)
    assert set(calls) == {"pytorch", "onnxruntime"}
    assert all(isinstance(reason, str) and "litedetr[peers]" in reason for reason in calls.values())


def test_the_table_and_json_carry_every_pair(peers, tmp_path, monkeypatch):
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "peers",
            "--models",
            "lite-dino-r18-tiny-h3l1-2x3",
            "rtdetr-r50vd",
            "--backends",
            "pytorch",
            "--size",
            "64",
            "64",
            "--repeats",
            "2",
            "--threads",
            "1",
            "--out",
            str(tmp_path),
        ],
    )
    monkeypatch.setattr(peers, "hf_model", lambda name: (_ for _ in ()).throw(ValueError("transformers is not installed")))
    peers.main()
    result = json.loads((tmp_path / "peers.json").read_text())
    row = result["models"]["lite-dino-r18-tiny-h3l1-2x3"]
    assert row["pytorch"] > 0
    assert row["best_over_reference"] is None  # RT-DETR did not run
    assert result["models"]["rtdetr-r50vd"]["pytorch"] == "does not build: transformers is not installed"
    table = (tmp_path / "peers.md").read_text()
    assert "| lite-dino-r18-tiny-h3l1-2x3 |" in table and "- (does not build: transformers is not installed)" in table


def test_bf16_backends_run_where_the_cpu_computes_bf16_and_say_why_not_elsewhere(peers, tmp_path, monkeypatch):
    backends = ("pytorch", "pytorch-bf16", "openvino", "openvino-bf16")
    monkeypatch.setattr(peers, "cpu_bf16_native", lambda: (False, "the CPU capability is AVX2"))
    calls = peers.build_calls("lite-dino-r18-tiny-h3l1-2x3", backends, (64, 64), 1, tmp_path)
    assert calls["pytorch-bf16"] == calls["openvino-bf16"] == "not timed: the CPU capability is AVX2"
    monkeypatch.setattr(peers, "cpu_bf16_native", lambda: (True, "forced"))  # emulated where not native: slow, still bf16
    calls = peers.build_calls("lite-dino-r18-tiny-h3l1-2x3", backends, (64, 64), 1, tmp_path)
    (full,), (half,) = calls["pytorch"](), calls["pytorch-bf16"]()
    assert 0 < (full["scores"][:10] - half["scores"][:10]).abs().max() < 0.05  # bf16: near float32, not equal
    ov, ov_bf16 = calls["openvino"](), calls["openvino-bf16"]()
    scores, scores_bf16 = (out[peers_output(out, "scores")][0, :10] for out in (ov, ov_bf16))
    assert np.abs(scores - scores_bf16).max() < 0.05
