"""Timing and peak memory of calls, on the CPU or a GPU, and the detector calls that benchmarks time.

Used by ``litedetr bench`` and by the scripts in ``benchmarks/``: :func:`measure` (median and
90th-percentile latency, peak memory beyond what was allocated before), and callables that run a
whole detector (:func:`model_run`), its encoder alone on real input-stage tokens (:func:`encoder_run`)
or one training step with the optimiser (:func:`train_step_run`), and where an inference call's time
goes, part by part (:func:`part_seconds`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from litedetr.models import Detector
from litedetr.models.image_batch import batch_images
from litedetr.weights import build_model

__all__ = [
    "Timing",
    "time_calls",
    "interleaved_ms",
    "peak_memory",
    "measure",
    "bench_model",
    "bench_images",
    "model_run",
    "encoder_run",
    "train_step_run",
    "PARTS",
    "part_seconds",
    "run_environment",
    "write_results",
]


@dataclass(frozen=True)
class Timing:
    """Seconds per call over the timed runs, and the peak extra memory of one call (bytes)."""

    median_s: float
    p90_s: float
    runs: int
    peak_memory_bytes: int


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


def interleaved_ms(calls: dict[Any, Callable[[], object]], repeats: int) -> dict[Any, list[float]]:
    """Milliseconds of each CPU call in each of ``repeats`` rounds, the calls taking turns within every
    round (one untimed call each first), so that load from other processes falls on all of them alike."""
    for call in calls.values():
        call()
    times: dict[Any, list[float]] = {key: [] for key in calls}
    for _ in range(repeats):
        for key, call in calls.items():
            start = time.perf_counter()
            call()
            times[key].append(1e3 * (time.perf_counter() - start))
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


PARTS = ("backbone", "input_stage", "encoder", "query_selection", "decoder", "heads")
"""The detector's parts in the order inference runs them (:meth:`Detector.forward_features`)."""


def part_seconds(model: Detector, images: Tensor, repeats: int, warmup: int = 1) -> list[dict[str, float]]:
    """Seconds of each of :data:`PARTS` and of the rest (``other``: resizing, batching and
    post-processing) in each of ``repeats`` inference calls of ``model`` on ``images`` after
    ``warmup`` untimed ones, and the whole call (``total``); CPU only (no device synchronisation).

    Forward hooks read the clock as each part starts and ends; a part that runs more than once in
    a call (none of ours) adds up.
    """
    if images.device.type != "cpu":
        raise ValueError(f"part_seconds times CPU calls only, got images on {images.device}")
    starts: dict[str, float] = {}
    current: dict[str, float] = {}

    def enter(name: str) -> Callable[..., None]:
        return lambda module, args: starts.__setitem__(name, time.perf_counter())

    def leave(name: str) -> Callable[..., None]:
        return lambda module, args, output: current.__setitem__(name, current.get(name, 0.0) + time.perf_counter() - starts[name])

    handles = []
    for name in PARTS:
        part = getattr(model, name)
        handles += [part.register_forward_pre_hook(enter(name)), part.register_forward_hook(leave(name))]
    run = model_run(model, images)
    records = []
    try:
        for i in range(warmup + repeats):
            current.clear()
            start = time.perf_counter()
            run()
            total = time.perf_counter() - start
            if i >= warmup:
                records.append({**{name: current.get(name, 0.0) for name in PARTS}, "other": total - sum(current.values()), "total": total})
    finally:
        for handle in handles:
            handle.remove()
    return records


def run_environment() -> dict[str, Any]:
    """What a benchmark's figures depend on, taken when its timing ends: the CPU's capability
    (AVX2, AVX512, ...) and name, the torch version and the load averages (1, 5, 15 min)."""
    return {
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "load_average_after": os.getloadavg(),
    }


def load_averages(loads: Sequence[float]) -> str:
    """The load averages (1, 5, 15 min) as a table caption says them: ``0.4, 0.9, 1.1``."""
    return ", ".join(f"{v:.1f}" for v in loads)


def write_results(folder: Path, stem: str, result: dict[str, Any], table: str) -> Path:
    """Write a benchmark's ``result`` and Markdown ``table`` as ``<stem>.json`` and ``<stem>.md`` in ``folder``; returns the ``.md``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{stem}.json").write_text(json.dumps(result, indent=2))
    path = folder / f"{stem}.md"
    path.write_text(table)
    return path
