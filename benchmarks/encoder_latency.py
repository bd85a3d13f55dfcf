"""Encoder latency of DINO vs Lite-DINO side by side, on the real input-stage tokens of one image.

Issue target: Lite-DINO H3L1-(2+1)x3's encoder at <= 0.5x DINO's on the CPU at 850x1040. All models
(R50, random weights, eval, no autograd) are built first; then each repeat times every encoder once
on each attention backend, in turn, so machine load affects them alike. Backends: ``kernel``, the
fused C++ CPU kernels (:mod:`litedetr.ops.cpu_kernels`, the default where they build), and
``pytorch``, the PyTorch implementation (``embedding_bag`` gathers). Ratios compare models on the
same backend. Prints a table and writes JSON.

    python benchmarks/encoder_latency.py [--size 850x1040] [--repeats 5] [--models dino-r50 lite-dino-r50-h3l1-2x3 ...]
        [--backends kernel pytorch]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from pathlib import Path

import torch

from litedetr import build_model
from litedetr.bench.timing import encoder_run
from litedetr.ops import cpu_kernels
from litedetr.tools.args import parse_size

BACKENDS = {"kernel": contextlib.nullcontext, "pytorch": cpu_kernels.cpu_kernels_disabled}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=parse_size, default=(850, 1040))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--models", nargs="+", default=["dino-r50", "lite-dino-r50-h3l1-2x3", "lite-dino-r50-h3l1-6x1", "lite-dino-r50-h2l2-2x3"])
    parser.add_argument("--backends", nargs="+", choices=list(BACKENDS), default=list(BACKENDS))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "encoder_latency.json")
    args = parser.parse_args()
    if "kernel" in args.backends and not cpu_kernels.enabled(torch.zeros(1)):
        parser.error("the C++ CPU kernels are not available here (see the warning above); use --backends pytorch")
    h, w = args.size
    images = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(0))
    runs = {}
    for name in args.models:
        torch.manual_seed(0)
        runs[name] = encoder_run(build_model(name, min_size=(min(h, w),), max_size=max(h, w)).eval(), images, train=False)
    for backend in args.backends:
        with BACKENDS[backend]():
            for run in runs.values():
                run()  # warm-up
    times: dict[str, dict[str, list[float]]] = {b: {name: [] for name in runs} for b in args.backends}
    for _ in range(args.repeats):
        for backend in args.backends:
            with BACKENDS[backend]():
                for name, run in runs.items():
                    start = time.perf_counter()
                    run()
                    times[backend][name].append(time.perf_counter() - start)
    medians = {b: {name: statistics.median(t) for name, t in per_model.items()} for b, per_model in times.items()}
    ratios = {b: {name: m / per_model[args.models[0]] for name, m in per_model.items()} for b, per_model in medians.items()}
    print(f"encoder latency at {h}x{w}, batch 1, {torch.get_num_threads()} threads, median of {args.repeats} (side by side)")
    print(f"{'model':<28}" + "".join(f" {b + ' ms':>12} {'vs ' + args.models[0]:>16}" for b in args.backends))
    for name in runs:
        print(f"{name:<28}" + "".join(f" {medians[b][name] * 1e3:>12.0f} {ratios[b][name]:>16.3f}" for b in args.backends))
    args.out.write_text(json.dumps({"size": [h, w], "threads": torch.get_num_threads(), "repeats": args.repeats,
                                    "median_s": medians, "ratio_to_first": ratios}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
