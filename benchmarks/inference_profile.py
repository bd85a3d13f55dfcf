"""Where one inference call's time goes, part by part: DINO against Lite-DINO, side by side.

Times every part of the detector (backbone, input stage, encoder, query selection, decoder, heads,
and the rest: resizing, batching and post-processing) in inference calls of each model on one
random image, the models taking turns call by call so that both see the same machine load, and sets
each part's median beside its GFLOPs (:func:`litedetr.bench.flops.count_flops`). Random weights:
the time of a call does not depend on them, except through which proposals the query selection
picks (the same amount of work whichever they are). Prints a table and writes
``inference_profile.json`` and ``.md`` to ``--out``.

    python benchmarks/inference_profile.py [--models dino-r50 lite-dino-r50-h3l1-2x3] [--size 850 1040] [--repeats 10] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from litedetr.bench.flops import count_flops
from litedetr.bench.timing import PARTS, bench_images, bench_model, load_averages, part_seconds, run_environment, write_results

COLUMNS = (*PARTS, "other", "total")


def markdown(result: dict) -> str:
    models = list(result["models"])
    first = models[0]
    h, w = result["size"]
    lines = [
        f"One inference call at {h}x{w}, batch 1, {result['threads']} threads ({result['cpu_capability']}, float32), C++ CPU kernels; "
        f"median of {result['repeats']} calls per model, the models taking turns call by call. Load averages (1, 5, 15 min) after: "
        + load_averages(result["load_average_after"])
        + ".",
        "",
        "| part | " + " | ".join(f"{m} ms | {m} GFLOPs" for m in models) + " | " + " | ".join(f"{m} / {first} (time, GFLOPs)" for m in models[1:]) + " |",
        "|---|" + "---:|---:|" * len(models) + "---:|" * (len(models) - 1),
    ]
    for part in COLUMNS:
        cells = []
        for m in models:
            flops = result["models"][m]["gflops"].get(part)
            cells += [f"{1e3 * result['models'][m]['median_s'][part]:.1f}", "-" if flops is None else f"{flops:.1f}"]
        for m in models[1:]:
            t0, t1 = result["models"][first]["median_s"][part], result["models"][m]["median_s"][part]
            f0, f1 = result["models"][first]["gflops"].get(part), result["models"][m]["gflops"].get(part)
            time_ratio = f"{t1 / t0:.2f}" if t0 > 0 else "-"
            flop_ratio = f"{f1 / f0:.2f}" if f0 and f1 is not None else "-"
            cells.append(f"{time_ratio}, {flop_ratio}")
        lines.append(f"| {part} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["dino-r50", "lite-dino-r50-h3l1-2x3"])
    parser.add_argument("--size", nargs=2, type=int, default=[850, 1040], metavar=("H", "W"))
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    size = tuple(args.size)
    images = bench_images(1, size)
    models = {name: bench_model(name, size).eval() for name in args.models}
    records: dict[str, list[dict[str, float]]] = {name: [] for name in models}
    for model in models.values():  # one untimed call each
        part_seconds(model, images, repeats=0, warmup=1)
    for _ in range(args.repeats):
        for name, model in models.items():
            records[name] += part_seconds(model, images, repeats=1, warmup=0)
    result = {
        "size": list(size),
        "threads": args.threads,
        "repeats": args.repeats,
        **run_environment(),
        "models": {},
    }
    for name, model in models.items():
        report = count_flops(model, size)
        gflops = {**report.components, "total": report.total}
        result["models"][name] = {
            "median_s": {part: statistics.median(r[part] for r in records[name]) for part in COLUMNS},
            "gflops": gflops,
        }
    table = markdown(result)
    print(table)
    print(f"wrote {write_results(args.out, 'inference_profile', result, table)}")


if __name__ == "__main__":
    main()
