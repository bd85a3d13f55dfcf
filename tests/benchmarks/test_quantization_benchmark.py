"""benchmarks/quantization.py: every variant asked for is scored by the same evaluation, timed, and tabled."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from conftest import benchmark_script

from litedetr import build_model, save_model
from litedetr.engine.evaluate import METRIC_NAMES
from litedetr.tools.export import spread_class_logits


def test_every_variant_is_scored_and_timed(tiny_synthetic, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = build_model("lite-dino-r18-tiny-h3l1-2x3", num_classes=5, num_queries=20, num_select=20, min_size=(64,), max_size=64)
    checkpoint = save_model(spread_class_logits(model.eval()), tmp_path / "m.safetensors")
    with benchmark_script("quantization") as quantization:
        monkeypatch.setattr(sys, "argv", ["quantization", "--model", str(checkpoint), "--data", str(tiny_synthetic),
                                          "--variants", "onnxruntime", "onnxruntime-int8", "pytorch-bf16",
                                          "--repeats", "1", "--threads", "1", "--out", str(tmp_path)])  # fmt: skip
        quantization.main()
    result = json.loads((tmp_path / "quantization.json").read_text())
    variants = result["variants"]
    assert list(variants) == ["pytorch", "onnxruntime", "onnxruntime-int8", "pytorch-bf16"] and result["size"] == [64, 64] and result["images"] == 2
    # (that a graph's detections equal the model's is tested on a trained model in tests/tools/test_pipeline_cli.py)
    for key in METRIC_NAMES:  # the float32 graph computes what the model does
        assert variants["onnxruntime"][key] == pytest.approx(variants["pytorch"][key], abs=1e-3), key
    assert all(0 <= row["AP"] <= 1 and row["ms"] > 0 for row in variants.values())
    table = (tmp_path / "quantization.md").read_text()
    assert all(f"| {name} |" in table for name in variants)
