"""Latency, throughput and peak memory of a detector and of its encoder alone.

The model is a preset with random weights whose image sizes are set to the requested ``H x W``, so
images are not resized: a run is the whole model as users call it (normalisation, backbone,
encoder, decoder, post-processing) on a ``(N, 3, H, W)`` batch. With ``train=True`` a run is a
training forward (losses against a few random boxes per image) plus the backward, without an
optimiser step (:func:`litedetr.bench.timing.train_step_run` adds the step). The encoder alone is timed on the real tokens
of the input stage (computed once). Each run can go under autocast (e.g. bf16).

Each measurement runs ``warmup`` untimed calls, then ``repeats`` timed ones (CUDA is synchronised
around each); latency is their median and 90th percentile (nearest rank). Peak memory is what one
call allocates beyond what was allocated before it (weights and inputs excluded): on CUDA from
``torch.cuda.max_memory_allocated``, on the CPU from the profiler's allocation events (the running
maximum of allocated minus freed bytes), in a separate, untimed call.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass

import torch

from litedetr.bench.flops import DEFAULT_SIZE
from litedetr.bench.timing import Timing, bench_images, bench_model, encoder_run, measure, model_run
from litedetr.ops import attention_backend
from litedetr.tools.args import int_at_least, parse_size

__all__ = ["BenchReport", "benchmark", "add_arguments"]

logger = logging.getLogger(__name__)


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
        lines.append(
            f"{label:>8}  {t.median_s * 1e3:>7.1f} ms  {t.p90_s * 1e3:>7.1f} ms  {report.batch / t.median_s:>9.2f}  {t.peak_memory_bytes / 2**20:>8.1f} MiB"
        )
    lines.append(f"({report.model_timing.runs} timed runs after warm-up; peak memory = allocated beyond weights and inputs)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
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
    p.set_defaults(func=run)
