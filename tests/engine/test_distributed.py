"""Multi-process training with gloo on the CPU: the same gradients as one process on the whole batch,
and the trainer running under torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
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


def mismatches(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], tolerance: float = 1e-4) -> list[str]:
    """Tensors whose largest difference exceeds ``tolerance`` x their own largest |gradient|.

    Summing the batch in another order (two processes and an all-reduce, other kernel blockings)
    changes gradients by float rounding, about 1e-6 of each tensor's scale here; boxes one pixel off
    change the box heads' by 1e-1 (see the test of an altered batch below).
    """
    assert got.keys() == expected.keys()
    bad = []
    for name, want in expected.items():
        diff, scale = (got[name] - want).abs().max().item(), want.abs().max().item()
        if diff > tolerance * scale + 1e-12:
            bad.append(f"{name}: max |diff| {diff:.3g} vs max |grad| {scale:.3g}")
    return bad


def _worker(rank: int, world: int, init_file: str, out: str, alter: bool) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = build_model(PRESET, **OVERRIDES).train()
    images, targets = batch()
    if alter and rank == world - 1:
        targets[-1]["boxes"] = targets[-1]["boxes"] + 1.0  # one box one pixel off, on the last rank only
    share = len(images) // world
    part = slice(rank * share, (rank + 1) * share)
    ddp = DistributedDataParallel(model)  # kept alive: its reducer all-reduces the gradients during backward
    sum(ddp(images[part], targets[part]).values()).backward()
    if rank == 0:
        torch.save(gradients(model), out)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def one_process_gradients() -> dict[str, torch.Tensor]:
    """Gradients of one process on the whole batch, with one thread like each DDP process (thread
    counts change the blocking of some CPU kernels, and with it the rounding)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = build_model(PRESET, **OVERRIDES).train()
        images, targets = batch()
        sum(model(images, targets).values()).backward()
        return gradients(model)
    finally:
        torch.set_num_threads(threads)


def ddp_gradients(folder: Path, alter: bool) -> dict[str, torch.Tensor]:
    mp.spawn(_worker, args=(2, str(folder / "init"), str(folder / "grads.pt"), alter), nprocs=2, join=True)
    return torch.load(folder / "grads.pt", weights_only=True)


@pytest.mark.slow
def test_two_gloo_processes_give_the_gradients_of_one_process_on_the_whole_batch(one_process_gradients, tmp_path):
    assert mismatches(ddp_gradients(tmp_path, alter=False), one_process_gradients) == []


@pytest.mark.slow
def test_the_gradient_comparison_catches_one_rank_with_an_altered_batch(one_process_gradients, tmp_path):
    altered = ddp_gradients(tmp_path, alter=True)
    bad = mismatches(altered, one_process_gradients)
    worst = max((altered[k] - g).abs().max().item() / g.abs().max().item() for k, g in one_process_gradients.items() if g.abs().max() > 0)
    assert bad and worst > 1e-2, (worst, bad)


@pytest.mark.slow
def test_trainer_under_torchrun_with_two_processes(tiny_synthetic, tmp_path):
    out = tmp_path / "run"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "litedetr.cli", "train",
        "--model", "deformable-detr-r18-tiny", "--data", str(tiny_synthetic), "--epochs", "1", "--batch-size", "1",
        "--image-sizes", "64", "--max-size", "64", "--workers", "0", "--out", str(out),
    ]  # fmt: skip
    result = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=900)  # about 8 s on a quiet machine
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2]  # 4 images over 2 processes, 1 per step each
    evaluation = [r for r in records if r["kind"] == "eval"]
    assert len(evaluation) == 1 and 0 <= evaluation[0]["AP"] <= 1
    assert (out / "checkpoint.pt").exists() and (out / "model.safetensors").exists()
    assert len(json.loads((out / "detections_val.json").read_text())) > 0
    assert Path(out / "curves.png").stat().st_size > 0


def _empty_batch_worker(rank: int, world: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    dino = build_model("dino-r18-tiny", num_classes=3, min_size=(64,), max_size=64, num_queries=10, num_select=10)
    model = DistributedDataParallel(dino.train())
    images, targets = batch()
    if rank == 1:  # COCO keeps images without objects: this rank's batch has none
        targets = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)} for _ in targets]
    for _ in range(2):  # DDP notices a parameter without gradient at the next iteration
        model.zero_grad()
        sum(model(images[:2], targets[:2]).values()).backward()
    if rank == 0:
        Path(out).write_text("trained")
    dist.destroy_process_group()


@pytest.mark.slow
def test_dino_trains_under_ddp_when_one_rank_has_no_objects(tmp_path):
    mp.spawn(_empty_batch_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "done")), nprocs=2, join=True)
    assert (tmp_path / "done").read_text() == "trained"


def _nan_worker(rank: int, world: int, init_file: str, data: str, out: str) -> None:
    """Trains through the Trainer; on rank 1 the decoder's class heads give NaN from the first step."""
    from litedetr.data import find_split
    from litedetr.engine import TrainConfig, Trainer
    from litedetr.engine.trainer import TrainingDiverged

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    train = find_split(Path(data), "train")
    config = TrainConfig(
        model=PRESET, model_overrides=dict(num_queries=10, num_select=10, one_to_many_queries=20), train_annotations=str(train.annotations),
        train_images=str(train.images), epochs=1, batch_size=1, image_sizes=(64,), max_size=64, workers=0,
    )  # fmt: skip
    trainer = Trainer(config, Path(out) / "run")
    if rank == 1:
        for head in trainer.model.modules():
            if isinstance(head, torch.nn.Linear) and head.out_features == trainer.train_set.num_classes:
                head.register_forward_hook(lambda module, inputs, output: output * float("nan"))
    try:
        trainer.fit()
        message = "trained without stopping"
    except TrainingDiverged as err:
        message = str(err)
    (Path(out) / f"rank{rank}.txt").write_text(message)
    dist.destroy_process_group()


@pytest.mark.slow
def test_a_nan_on_one_rank_stops_every_rank_with_its_message(tiny_synthetic, tmp_path):
    """The loss terms are checked once, after the all-reduce: a check that raised on rank 1 alone would
    leave rank 0 waiting in the next collective for ever (the test would then time out)."""
    context = mp.start_processes(_nan_worker, args=(2, str(tmp_path / "init"), str(tiny_synthetic), str(tmp_path)), nprocs=2, join=False)
    deadline = time.monotonic() + 600  # about 10 s on a quiet machine
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("a rank is still waiting 600 s after the NaN")
    messages = [(tmp_path / f"rank{rank}.txt").read_text() for rank in range(2)]
    assert messages[0] == messages[1], messages
    assert messages[0].startswith("the loss became nan on rank 1 (not finite: loss_class"), messages[0]
    assert "on rank 0" not in messages[0] and "at epoch 1, step 1" in messages[0]
