"""Latency, throughput and peak memory of a detector and of its encoder alone.

The model is a preset with random weights whose image sizes are set to the requested ``H x W``, so
images are not resized: a run is the whole model as users call it (normalisation, backbone,
encoder, decoder, post-processing) on a ``(N, 3, H, W)`` batch. With ``train=True`` a run is a
training forward (losses against a few random boxes per image) plus the backward, without an
optimiser step (:func:`train_step_run` adds the step). The encoder alone is timed on the real tokens
of the input stage (computed once). Each run can go under autocast (e.g. bf16).

Each measurement runs ``warmup`` untimed calls, then ``repeats`` timed ones (CUDA is synchronised
around each); latency is their median and 90th percentile (nearest rank). Peak memory is what one
call allocates beyond what was allocated before it (weights and inputs excluded): on CUDA from
``torch.cuda.max_memory_allocated``, on the CPU from the profiler's allocation events (the running
maximum of allocated minus freed bytes), in a separate, untimed call.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from litedetr.models import Detector, build_model
from litedetr.models.transform import batch_images
from litedetr.ops import attention_backend
from litedetr.tools.args import int_at_least, parse_size
from litedetr.tools.flops import DEFAULT_SIZE

__all__ = [
    "Timing",
    "BenchReport",
    "benchmark",
    "time_calls",
    "peak_memory",
    "measure",
    "bench_model",
    "bench_images",
    "model_run",
    "encoder_run",
    "train_step_run",
    "add_arguments",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Timing:
    """Seconds per call over the timed runs, and the peak extra memory of one call (bytes)."""

    median_s: float
    p90_s: float
    runs: int
    peak_memory_bytes: int


@dataclass(frozen=True)
class BenchReport:
    model: str
    size: tuple[int, int]
    device: str
    batch: int
    train: bool
    model_timing: Timing
    encoder_timing: Timing
    attention: str
    """The deformable-attention implementation that ran (:func:`litedetr.ops.attention_backend`)."""

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "size": list(self.size),
            "device": self.device,
            "batch": self.batch,
            "mode": "train (forward + backward)" if self.train else "inference",
            "model_latency_s": self.model_timing.median_s,
            "model_latency_p90_s": self.model_timing.p90_s,
            "images_per_s": self.batch / self.model_timing.median_s,
            "model_peak_memory_bytes": self.model_timing.peak_memory_bytes,
            "encoder_latency_s": self.encoder_timing.median_s,
            "encoder_latency_p90_s": self.encoder_timing.p90_s,
            "encoder_images_per_s": self.batch / self.encoder_timing.median_s,
            "encoder_peak_memory_bytes": self.encoder_timing.peak_memory_bytes,
            "runs": self.model_timing.runs,
            "attention": self.attention,
        }


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(run: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``run`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        run()
        _synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def peak_memory(run: Callable[[], object], device: torch.device) -> int:
    """Bytes one call of ``run`` allocates at its peak beyond what was allocated before it."""
    if device.type == "cuda":
        _synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        run()
        _synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and e.device_type() == DeviceType.CPU)
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def measure(run: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1) -> Timing:
    """Median and 90th-percentile (nearest rank) seconds of ``repeats`` calls after ``warmup`` ones, and the peak memory of one more."""
    times = sorted(time_calls(run, device, repeats, warmup))
    p90 = times[max(math.ceil(0.9 * len(times)) - 1, 0)]
    return Timing(statistics.median(times), p90, len(times), peak_memory(run, device))


def _random_targets(batch: int, h: int, w: int, device: torch.device, num_classes: int) -> list[dict[str, Tensor]]:
    """Three random boxes (absolute ``xyxy``) per image."""
    g = torch.Generator().manual_seed(0)
    targets = []
    for _ in range(batch):
        xy = torch.rand(3, 2, generator=g) * torch.tensor([w * 0.5, h * 0.5])
        wh = (torch.rand(3, 2, generator=g) * 0.4 + 0.1) * torch.tensor([w, h])
        targets.append({"boxes": torch.cat([xy, xy + wh], 1).to(device), "labels": torch.randint(num_classes, (3,), generator=g).to(device)})
    return targets


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[object]:
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def bench_model(preset: str, size: tuple[int, int], device: str | torch.device = "cpu", **overrides: Any) -> Detector:
    """``preset`` with random weights (and ``overrides``), its image sizes set to ``size = (H, W)`` so images are not resized."""
    h, w = size
    return build_model(preset, min_size=(min(h, w),), max_size=max(h, w), **overrides).to(device)


def bench_images(batch: int, size: tuple[int, int], device: str | torch.device = "cpu") -> Tensor:
    """``(batch, 3, H, W)`` random images in [0, 1], the same for a given shape."""
    return torch.rand(batch, 3, *size, generator=torch.Generator().manual_seed(0)).to(device)


def model_run(model: Detector, images: Tensor, train: bool = False, autocast: torch.dtype | None = None) -> Callable[[], object]:
    """A call of ``model`` on ``images``: inference (no autograd), or with ``train`` a training forward and backward; under autocast in ``autocast``."""
    amp = _autocast(images.device, autocast)
    if not train:

        @torch.no_grad()
        def infer() -> object:
            with amp:
                return model(images)

        return infer
    targets = _random_targets(images.shape[0], images.shape[2], images.shape[3], images.device, model.config.num_classes)

    def run() -> None:
        with amp:
            loss = sum(model(images, targets).values())
        loss.backward()
        model.zero_grad(set_to_none=True)

    return run


def train_step_run(model: Detector, images: Tensor, optimizer: torch.optim.Optimizer, autocast: torch.dtype | None = None) -> Callable[[], object]:
    """One training step of ``model`` (in train mode) on ``images`` with random boxes: forward (under autocast), backward, ``optimizer`` step."""
    targets = _random_targets(images.shape[0], images.shape[2], images.shape[3], images.device, model.config.num_classes)
    amp = _autocast(images.device, autocast)

    def step() -> None:
        with amp:
            loss = sum(model(images, targets).values())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def encoder_run(model: Detector, images: Tensor, train: bool, autocast: torch.dtype | None = None) -> Callable[[], object]:
    """A call of ``model``'s encoder alone on the input-stage tokens of ``images (B, 3, H, W)`` (computed once), under autocast in ``autocast``."""
    cfg = model.config
    amp = _autocast(images.device, autocast)
    batch = batch_images(images, cfg.min_size, cfg.max_size, training=False)
    with torch.no_grad(), amp:
        t = model.input_stage(model.backbone(batch.tensors), batch.mask)
    args = (t.src, t.pos, t.spatial_shapes, t.valid_ratios, t.padding_mask)
    if not train:

        @torch.no_grad()
        def infer() -> object:
            with amp:
                return model.encoder(*args)

        return infer

    def run() -> None:
        with amp:
            out = model.encoder(*args)
        out.float().sum().backward()
        model.encoder.zero_grad(set_to_none=True)

    return run


def benchmark(
    preset: str,
    size: tuple[int, int] = DEFAULT_SIZE,
    device: str = "cpu",
    batch: int = 1,
    train: bool = False,
    repeats: int = 10,
    warmup: int = 1,
) -> BenchReport:
    """Time ``preset`` (random weights) and its encoder on ``batch`` random ``size = (H, W)`` images.

    Raises:
        ValueError: bad size, batch, repeats, or a CUDA device without CUDA.
    """
    h, w = size
    if h < 1 or w < 1 or batch < 1 or repeats < 1 or warmup < 0:
        raise ValueError(f"need positive size, batch and repeats (got {h}x{w}, batch {batch}, repeats {repeats})")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but CUDA is not available")
    model = bench_model(preset, size, dev)
    model.train(train)
    images = bench_images(batch, size, dev)
    model_timing = measure(model_run(model, images, train), dev, repeats, warmup)
    encoder_timing = measure(encoder_run(model, images, train), dev, repeats, warmup)
    attention = attention_backend(torch.empty(0, device=dev).requires_grad_(train))
    report = BenchReport(preset, (h, w), str(dev), batch, train, model_timing, encoder_timing, attention)
    logger.info("%s: model %.4f s, encoder %.4f s (median of %d)", preset, model_timing.median_s, encoder_timing.median_s, repeats)
    return report


def format_report(report: BenchReport) -> str:
    mode = "training step (forward + backward)" if report.train else "inference"
    lines = [f"{report.model} at {report.size[0]}x{report.size[1]}, batch {report.batch}, {report.device}, {mode}, attention: {report.attention}"]
    lines.append(f"{'':>8}  {'median':>10}  {'p90':>10}  {'images/s':>9}  {'peak memory':>12}")
    for label, t in (("model", report.model_timing), ("encoder", report.encoder_timing)):
        lines.append(f"{label:>8}  {t.median_s * 1e3:>7.1f} ms  {t.p90_s * 1e3:>7.1f} ms  {report.batch / t.median_s:>9.2f}  {t.peak_memory_bytes / 2**20:>8.1f} MiB")
    lines.append(f"({report.model_timing.runs} timed runs after warm-up; peak memory = allocated beyond weights and inputs)")
    return "\n".join(lines)


def cmd_bench(args: argparse.Namespace) -> int:
    report = benchmark(args.model, args.size, args.device, args.batch, args.train, args.repeats)
    print(json.dumps(report.to_dict()) if args.json else format_report(report))
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``litedetr bench``; sets ``func``."""
    p.add_argument("--model", required=True, help="model preset, e.g. lite-dino-r50-h3l1-2x3 (random weights)")
    p.add_argument("--size", type=parse_size, default=DEFAULT_SIZE, help="image size HxW, not resized (default 850x1040)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--batch", type=int_at_least(1), default=1, help="images per call (default 1)")
    p.add_argument("--train", action="store_true", help="time a training forward + backward instead of inference")
    p.add_argument("--repeats", type=int_at_least(1), default=10, help="timed runs after one warm-up (default 10)")
    p.add_argument("--json", action="store_true", help="print one JSON object (latencies in seconds)")
    p.set_defaults(func=cmd_bench)
