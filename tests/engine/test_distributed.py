"""Multi-process training with gloo on the CPU: the same gradients as one process on the whole batch,
and the trainer running under torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from litedetr import build_model

PRESET = "lite-h-detr-r18-tiny-h3l1-2x3"  # KDA encoder and a one-to-many branch; no random denoising
OVERRIDES = dict(num_classes=3, min_size=(64,), max_size=64, num_queries=10, num_select=10, one_to_many_queries=20)


def batch() -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    generator = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 64, 64, generator=generator) for _ in range(4)]
    targets = [
        {"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0], [20.0, 10.0, 60.0, 50.0]][: 1 + i % 2]), "labels": torch.tensor([i % 3, (i + 1) % 3][: 1 + i % 2])}
        for i in range(4)
    ]
    return images, targets


def gradients(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _worker(rank: int, world: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = build_model(PRESET, **OVERRIDES).train()
    images, targets = batch()
    share = len(images) // world
    part = slice(rank * share, (rank + 1) * share)
    ddp = DistributedDataParallel(model)  # kept alive: its reducer all-reduces the gradients during backward
    sum(ddp(images[part], targets[part]).values()).backward()
    if rank == 0:
        torch.save(gradients(model), out)
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_processes_give_the_gradients_of_one_process_on_the_whole_batch(tmp_path):
    torch.manual_seed(0)
    model = build_model(PRESET, **OVERRIDES).train()
    images, targets = batch()
    sum(model(images, targets).values()).backward()
    expected = gradients(model)

    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "grads.pt")), nprocs=2, join=True)
    got = torch.load(tmp_path / "grads.pt", weights_only=True)
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


@pytest.mark.slow
def test_trainer_under_torchrun_with_two_processes(tiny_synthetic, tmp_path):
    out = tmp_path / "run"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "litedetr.cli", "train",
        "--model", "deformable-detr-r18-tiny", "--data", str(tiny_synthetic), "--epochs", "1", "--batch-size", "1",
        "--image-sizes", "64", "--max-size", "64", "--workers", "0", "--out", str(out),
    ]  # fmt: skip
    result = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2]  # 4 images over 2 processes, 1 per step each
    evaluation = [r for r in records if r["kind"] == "eval"]
    assert len(evaluation) == 1 and 0 <= evaluation[0]["AP"] <= 1
    assert (out / "checkpoint.pt").exists() and (out / "model.safetensors").exists()
    assert len(json.loads((out / "detections_val.json").read_text())) > 0
    assert Path(out / "curves.png").stat().st_size > 0
