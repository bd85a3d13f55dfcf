"""Resuming: a run killed part-way (SIGKILL) or stopped (SIGTERM) and resumed ends with exactly the
parameters of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from litedetr.engine.state import load_state

pytestmark = pytest.mark.slow

TIMEOUT_S = 600
"""For each training process: a run takes about 8 s on a quiet machine."""


def train_command(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "litedetr.cli", "train", "--model", "lite-deformable-detr-r18-tiny-h3l1-2x3", "--data", str(data),
        "--epochs", "2", "--batch-size", "1", "--image-sizes", "64", "--max-size", "64", "--workers", "0", "--deterministic",
        "--checkpoint-every", "1", "--eval-every", "2", "--out", str(out), *extra,
    ]  # fmt: skip


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def train_steps(out: Path) -> int:
    log = out / "log.jsonl"
    return sum(1 for line in log.read_text().splitlines() if json.loads(line)["kind"] == "train") if log.exists() else 0


def interrupt(command: list[str], out: Path, sig: int, after_steps: int, group: bool = False) -> tuple[int, str]:
    """Start ``command``, send ``sig`` once ``after_steps`` steps are logged (to its whole process group
    with ``group``, as ``timeout``, ``docker stop`` and Slurm do); returns the exit code and stderr."""
    process = subprocess.Popen(command, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=group)
    deadline = time.monotonic() + TIMEOUT_S
    while train_steps(out) < after_steps and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    if process.poll() is not None or train_steps(out) < after_steps:
        process.kill()
        _, stderr = process.communicate()
        pytest.fail(f"the run logged {train_steps(out)} of {after_steps} steps before it ended or {TIMEOUT_S} s passed:\n{stderr[-3000:]}")
    if group:
        os.killpg(process.pid, sig)
    else:
        process.send_signal(sig)
    _, stderr = process.communicate(timeout=TIMEOUT_S)
    return process.returncode, stderr


@pytest.fixture(scope="module")
def straight(tiny_synthetic, tmp_path_factory) -> Path:
    """An uninterrupted run."""
    out = tmp_path_factory.mktemp("straight") / "run"
    subprocess.run(train_command(tiny_synthetic, out), env=env(), check=True, capture_output=True, timeout=TIMEOUT_S)
    return out


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_interrupted_and_resumed_run_equals_a_straight_run(tiny_synthetic, straight, tmp_path, sig):
    resumed = tmp_path / "resumed"
    total = train_steps(straight)
    assert total == 8  # 2 epochs x 4 images, one per step

    code, stderr = interrupt(train_command(tiny_synthetic, resumed), resumed, sig, after_steps=3)
    assert code == (-signal.SIGKILL if sig == signal.SIGKILL else 130), stderr
    stopped_at = load_state(resumed / "checkpoint.pt")["step"]
    assert 1 <= stopped_at < total, "the run must be stopped part-way"

    subprocess.run(train_command(tiny_synthetic, resumed, "--resume"), env=env(), check=True, capture_output=True, timeout=TIMEOUT_S)
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed parameters differ from the straight run's"
    assert load_state(resumed / "checkpoint.pt")["step"] == total
    assert train_steps(resumed) == total, "the log holds each step once"
    metrics = [json.loads(line) for line in (resumed / "log.jsonl").read_text().splitlines() if '"eval"' in line]
    assert len(metrics) == 1 and 0 <= metrics[0]["AP"] <= 1


def test_sigterm_to_the_whole_process_group_with_workers_checkpoints(tiny_synthetic, tmp_path):
    out = tmp_path / "run"
    command = [*train_command(tiny_synthetic, out), "--workers", "2"]
    code, stderr = interrupt(command, out, signal.SIGTERM, after_steps=2, group=True)
    assert code == 130 and "Traceback" not in stderr, stderr[-3000:]
    assert load_state(out / "checkpoint.pt")["step"] >= 2
