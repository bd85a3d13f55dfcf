"""The benchmark tool: report shape and sanity on a tiny model, peak-memory measurement, CLI."""

from __future__ import annotations

import json

import pytest
import torch

from litedetr.bench.timing import bench_images, bench_model, encoder_run, peak_memory, train_step_run
from litedetr.cli import main
from litedetr.ops import cpu_kernels
from litedetr.tools.bench import benchmark

TINY = "lite-dino-r18-tiny-h3l1-2x3"


def test_bench_reports_model_and_encoder():
    report = benchmark(TINY, (64, 64), batch=2, repeats=2).to_dict()
    assert report["batch"] == 2 and report["mode"] == "inference" and report["runs"] == 2
    assert 0 < report["encoder_latency_s"] < report["model_latency_s"] <= report["model_latency_p90_s"]
    assert report["images_per_s"] == pytest.approx(2 / report["model_latency_s"])
    assert 0 < report["encoder_peak_memory_bytes"] < report["model_peak_memory_bytes"]
    assert report["attention"] in ("cpu_kernel", "gather")


def test_training_step_needs_more_memory_than_inference():
    inference = benchmark(TINY, (64, 64), repeats=1, warmup=0)
    train = benchmark(TINY, (64, 64), repeats=1, warmup=0, train=True)
    assert train.model_timing.peak_memory_bytes > inference.model_timing.peak_memory_bytes
    assert train.attention == ("cpu_kernel" if cpu_kernels.load() is not None else "grid_sample")  # the fused backward where it builds


def test_training_step_updates_the_weights_under_autocast():
    model = bench_model(TINY, (64, 64)).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    linear_dtypes = []
    first_linear = next(m for m in model.encoder.modules() if isinstance(m, torch.nn.Linear))
    first_linear.register_forward_hook(lambda module, args, out: linear_dtypes.append(out.dtype))
    train_step_run(model, bench_images(2, (64, 64)), optimizer, autocast=torch.bfloat16)()
    changed = [name for name, p in model.named_parameters() if name in before and not torch.equal(p, before[name])]
    assert len(changed) > 0.8 * len(before)
    assert all(p.grad is None for p in model.parameters())
    assert linear_dtypes and set(linear_dtypes) == {torch.bfloat16}
    linear_dtypes.clear()
    encoder_run(model.eval(), bench_images(1, (64, 64)), False)()
    assert set(linear_dtypes) == {torch.float32}


def test_cpu_peak_memory_tracks_allocations():
    size = 4 * 2**20  # one float32 tensor of 4 MiB alive at a time, two at the peak

    def run() -> None:
        a = torch.ones(2**20)
        b = a * 2
        del a
        c = b + 1
        del b, c

    assert peak_memory(run, torch.device("cpu")) == pytest.approx(2 * size, rel=0.01)


def test_cli_json_and_errors(capsys):
    assert main(["bench", "--model", TINY, "--size", "64x64", "--repeats", "1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model_latency_s"] > 0 and report["encoder_latency_s"] > 0 and report["device"] == "cpu"
    with pytest.raises(SystemExit, match="2"):
        main(["bench", "--model", TINY, "--size", "64x64", "--batch", "0"])
