"""benchmarks/gpu_check.py: a dry run on the CPU fills every section with consistent values; a failing
row or section and a spent time budget are recorded, not fatal."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from litedetr.ops import cpu_kernels

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
SCRIPT = BENCHMARKS / "gpu_check.py"
TINY = ["dino-r18-tiny", "lite-dino-r18-tiny-h3l1-2x3", "lite-dino-r18-tiny-h2l2-2x3"]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("gpu_check")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out)], capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check_dry_run.json", "gpu_check_dry_run.md"]
    return {"result": json.loads((out / "gpu_check_dry_run.json").read_text()), "markdown": (out / "gpu_check_dry_run.md").read_text(), "stdout": proc.stdout}


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses resolve annotations through sys.modules
    sys.path.insert(0, str(BENCHMARKS))  # its report module sits beside it
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(BENCHMARKS))
        del sys.modules["gpu_check"]


def rows(result: dict[str, Any], section: str) -> list[dict[str, Any]]:
    return result["sections"][section]["rows"]


def test_every_section_runs_and_the_report_is_printed(dry_run):
    result = dry_run["result"]
    assert result["meta"]["dry_run"] is True and result["meta"]["device"] == "cpu" and result["meta"]["size"] == [64, 96]
    assert list(result["sections"]) == ["triton_tests", "kernels", "inference", "train_step", "inference_compiled"]
    assert {name: s["status"] for name, s in result["sections"].items()} == dict.fromkeys(result["sections"], "ok")
    assert all(s["seconds"] > 0 for s in result["sections"].values())
    assert 0 < sum(s["seconds"] for s in result["sections"].values()) < result["meta"]["elapsed_s"]
    tests = result["sections"]["triton_tests"]
    assert tests["passed"] >= 1 and tests["failed"] == tests["errors"] == 0 and tests["returncode"] == 0
    assert dry_run["markdown"] in dry_run["stdout"]
    for heading in ("## Triton tests", "## Deformable attention", "## Whole model, inference (eager)", "## Encoder alone", "## One training step"):
        assert heading in dry_run["markdown"]
    assert "Sections not fully run" not in dry_run["markdown"]


def test_kernel_rows_and_ratios(dry_run):
    result = dry_run["result"]
    found = {(r["op"], r["method"], r["dtype"]): r for r in rows(result, "kernels")}
    ops = {"msda": ("ours", "pytorch"), "kda": ("ours", "pytorch", "two_pass"), "kda_distinct_key": ("ours", "pytorch", "two_pass")}
    assert set(found) == {(op, m, dtype) for op, methods in ops.items() for m in methods for dtype in ("float32", "bfloat16")}
    for (op, method, dtype), r in found.items():
        assert 0 < r["fwd_ms"] <= r["fwd_p90_ms"] and 0 < r["fwd_bwd_ms"] <= r["fwd_bwd_p90_ms"]
        assert r["fwd_peak_mib"] > 0 and r["fwd_bwd_peak_mib"] > 0
        assert r["max_abs_diff_vs_fp32_grid_sample"] < (1e-5 if dtype == "float32" else 0.2)
        fused = method == "ours" and cpu_kernels.load() is not None  # the C++ kernels' fused backward where they build
        assert r["fwd_bwd_backend"] == ("cpu_kernel" if fused else "grid_sample")
        if method == "two_pass":
            assert r["fwd_peak_mib"] > found[op, "ours", dtype]["fwd_peak_mib"]  # keys and values sampled apart
    assert found["kda", "ours", "float32"]["fwd_backend"] in ("cpu_kernel", "gather")
    assert found["kda", "pytorch", "float32"]["fwd_backend"] == "gather"
    ratios = result["summary"]["kernels"]
    assert len(ratios) == 10
    for ratio in ratios:
        ours, other = found[ratio["op"], "ours", ratio["dtype"]], found[ratio["op"], ratio["versus"], ratio["dtype"]]
        assert ratio["fwd_speedup"] == pytest.approx(other["fwd_ms"] / ours["fwd_ms"])
        assert ratio["fwd_bwd_speedup"] == pytest.approx(other["fwd_bwd_ms"] / ours["fwd_bwd_ms"])
        assert ratio["fwd_bwd_memory_ratio"] == pytest.approx(ours["fwd_bwd_peak_mib"] / other["fwd_bwd_peak_mib"])


def test_model_rows_and_ratios(dry_run):
    result = dry_run["result"]
    found = {(r["model"], r["precision"], r["batch"]): r for r in rows(result, "inference")}
    assert set(found) == {(m, p, 2) for m in TINY for p in ("fp32", "bf16")}
    for (_, _, batch), r in found.items():
        for part in ("model", "encoder"):
            assert 0 < r[f"{part}_p50_ms"] <= r[f"{part}_p90_ms"] and r[f"{part}_peak_mib"] > 0
            assert r[f"{part}_images_per_s"] == pytest.approx(batch * 1e3 / r[f"{part}_p50_ms"])
    ratios = result["summary"]["models"]
    assert {(r["model"], r["precision"], r["batch"]) for r in ratios} == {k for k in found if k[0] != TINY[0]}
    for ratio in ratios:
        row, base = found[ratio["model"], ratio["precision"], ratio["batch"]], found[TINY[0], ratio["precision"], ratio["batch"]]
        assert ratio["baseline"] == TINY[0]
        assert ratio["images_per_s_ratio"] == pytest.approx(row["model_images_per_s"] / base["model_images_per_s"])
        assert ratio["encoder_latency_ratio"] == pytest.approx(row["encoder_p50_ms"] / base["encoder_p50_ms"])
        assert ratio["compiled_images_per_s_ratio"] is None  # the dry run compiles one model only
    (compiled,) = rows(result, "inference_compiled")
    assert compiled["model"] == TINY[1] and compiled["first_call_s"] > compiled["model_p50_ms"] / 1e3 > 0


def test_training_step_rows(dry_run):
    result = dry_run["result"]
    found = {r["model"]: r for r in rows(result, "train_step")}
    assert list(found) == TINY
    inference = {(r["model"], r["precision"], r["batch"]): r for r in rows(result, "inference")}
    for model, r in found.items():
        assert r["precision"] == "bf16" and r["batch"] == 2 and 0 < r["step_p50_ms"] <= r["step_p90_ms"]
        assert r["step_peak_mib"] > inference[model, "bf16", 2]["model_peak_mib"]  # gradients and saved activations
    for ratio in result["summary"]["train_step"]:
        assert ratio["step_latency_ratio"] == pytest.approx(found[ratio["model"]]["step_p50_ms"] / found[TINY[0]]["step_p50_ms"])


def test_a_failing_row_or_section_and_a_spent_budget_are_recorded(gpu_check, monkeypatch):
    def fails(item: dict[str, Any]) -> dict[str, Any]:
        if item["i"] == 1:
            raise ValueError("boom")
        return {"value": item["i"] * 10}

    budget = gpu_check.Budget(60, time.monotonic())
    assert gpu_check.run_rows([{"i": 1}, {"i": 2}], fails, budget) == [{"i": 1, "error": "ValueError: boom"}, {"i": 2, "value": 20}]
    spent = gpu_check.Budget(0, time.monotonic() - 1)
    assert gpu_check.run_rows([{"i": 2}], fails, spent) == [{"i": 2, "skipped": "time budget spent"}]

    def forever(item: dict[str, Any]) -> dict[str, Any]:
        while True:
            time.sleep(0.01)

    sections = {
        "fine": lambda plan, budget: {"rows": gpu_check.run_rows([{"i": 2}], fails, budget)},
        "broken": lambda plan, budget: {"x": 1 / 0},
        "slow": lambda plan, budget: {"rows": gpu_check.run_rows([{"i": 3}, {"i": 4}], forever, budget)},
        "late": lambda plan, budget: {"rows": []},
    }
    monkeypatch.setattr(gpu_check, "SECTIONS", sections)
    start = time.monotonic()
    got = gpu_check.run_check(gpu_check.DRY_RUN_PLAN, gpu_check.Budget(1.0, start))
    assert time.monotonic() - start < 5
    assert [s["status"] for s in got.values()] == ["ok", "error", "partial", "skipped"]
    assert got["broken"]["error"] == "ZeroDivisionError: division by zero"
    assert got["slow"]["rows"][0]["error"].startswith("BudgetExceeded: the time budget of 0.02 min ran out")
    assert got["slow"]["rows"][1] == {"i": 4, "skipped": "time budget spent"}


def test_junit_counts_name_the_failures(gpu_check, tmp_path):
    report = tmp_path / "junit.xml"
    report.write_text(
        '<testsuites><testsuite tests="4" failures="1" errors="1" skipped="1">'
        '<testcase name="a"/><testcase name="b"><failure message="assert 1 == 2&#10;where ...">trace</failure></testcase>'
        '<testcase name="c"><error message="">trace</error></testcase><testcase name="d"><skipped/></testcase>'
        "</testsuite></testsuites>"
    )
    expected = {"passed": 1, "failed": 1, "errors": 1, "skipped": 1, "failures": ["b: assert 1 == 2", "c: error"]}
    assert gpu_check._junit_counts(report) == expected
