"""Encoder latency of DINO vs Lite-DINO side by side, on the real input-stage tokens of one image.

Issue target: Lite-DINO H3L1-(2+1)x3's encoder at <= 0.5x DINO's on the CPU at 850x1040. Both models
(R50, random weights, eval, no autograd) are built first; then each repeat times every encoder once,
in turn, so machine load affects them alike. Prints a table and writes JSON.

    python benchmarks/encoder_latency.py [--size 850x1040] [--repeats 5] [--models dino-r50 lite-dino-r50-h3l1-2x3 ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from litedetr import build_model
from litedetr.tools.bench import encoder_run
from litedetr.tools.flops import parse_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=parse_size, default=(850, 1040))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--models", nargs="+", default=["dino-r50", "lite-dino-r50-h3l1-2x3", "lite-dino-r50-h3l1-6x1", "lite-dino-r50-h2l2-2x3"])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "encoder_latency.json")
    args = parser.parse_args()
    h, w = args.size
    images = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(0))
    runs = {}
    for name in args.models:
        torch.manual_seed(0)
        runs[name] = encoder_run(build_model(name, min_size=(min(h, w),), max_size=max(h, w)).eval(), images, train=False)
        runs[name]()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(t) for name, t in times.items()}
    base = medians[args.models[0]]
    print(f"encoder latency at {h}x{w}, batch 1, {torch.get_num_threads()} threads, median of {args.repeats} (side by side)")
    print(f"{'model':<28} {'median':>10} {'vs ' + args.models[0]:>14}")
    for name, median in medians.items():
        print(f"{name:<28} {median * 1e3:>7.0f} ms {median / base:>13.3f}")
    args.out.write_text(json.dumps({"size": [h, w], "threads": torch.get_num_threads(), "repeats": args.repeats,
                                    "median_s": medians, "ratio_to_first": {n: m / base for n, m in medians.items()}}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
