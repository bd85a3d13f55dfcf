"""CPU latency of exported ONNX graphs in onnxruntime (and OpenVINO) vs the same detectors in PyTorch, side by side.

For each preset (random weights; latency does not depend on them): export at ``--size`` once per
``--sampling`` (the deformable attention as ``GridSample``, or as ``Gather`` and ``MatMul``:
:func:`~litedetr.ops.traced_sampling`), then time PyTorch (eval, no autograd: the C++ kernels on the
CPU) and every graph in every ``--backends`` runtime on one synthetic scene, all with ``--threads``
intra-op threads, median of ``--repeats`` after one warm-up, all the calls taking turns. The class
heads are redrawn as a trained model's spread their logits
(:func:`~litedetr.tools.export.spread_class_logits`). Reports, per graph in onnxruntime, the max abs
difference of the final boxes (pixels) and scores from PyTorch's, and, per query before any top-k, given
the same ranking of the encoder's proposals (:func:`~litedetr.tools.export.query_parity`): the logits'
and boxes' differences, and how many query positions the two rank otherwise, with the largest score gap
among them (near-ties below float32 rounding, which DINO-style models turn into other final detections).

    python benchmarks/onnx_speed.py [--size 480x640] [--repeats 5] [--threads 2] [--presets ...]
        [--sampling grid_sample gather] [--backends onnxruntime openvino] [--out benchmarks/results/onnx_speed.json]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import onnxruntime
import torch

from litedetr import build_model
from litedetr.models.exported import graph_runner
from litedetr.ops import TRACED_SAMPLING
from litedetr.tools.export import (
    OnnxDetector,
    compare_with_runtime,
    export_onnx,
    normalized_scene,
    query_parity,
    spread_class_logits,
)

PRESETS = (
    "lite-dino-r18-tiny-h3l1-2x3",
    "dino-r18-tiny",
    "lite-deformable-detr-r18-tiny-h3l1-2x3",
    "lite-h-detr-r18-tiny-h3l1-2x3",
    "lite-dino-r50-h3l1-2x3",
    "dino-r50",
)


def interleaved_medians(fns: list, repeats: int) -> list[float]:
    """Median milliseconds of each function, run in turn within every repeat (after one warm-up each), so that
    load from other processes on a shared machine falls on all of them alike."""
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, record in zip(fns, times):
            start = time.perf_counter()
            fn()
            record.append(time.perf_counter() - start)
    return [1000 * statistics.median(t) for t in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="480x640", help="input HxW (default 480x640)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--presets", nargs="+", default=list(PRESETS))
    parser.add_argument("--sampling", nargs="+", choices=TRACED_SAMPLING, default=["grid_sample"])
    parser.add_argument("--backends", nargs="+", choices=["onnxruntime", "openvino"], default=["onnxruntime"])
    parser.add_argument("--out", default="benchmarks/results/onnx_speed.json")
    args = parser.parse_args()
    size = tuple(int(v) for v in args.size.split("x"))
    torch.set_num_threads(args.threads)
    images = normalized_scene(1, *size, seed=0)
    graphs = [f"{backend} {sampling}" for sampling in args.sampling for backend in args.backends]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.presets:
            torch.manual_seed(0)
            model = spread_class_logits(build_model(name).eval())
            wrapper = OnnxDetector(model, size).eval()
            paths = {sampling: export_onnx(model, Path(tmp) / f"{name}-{sampling}.onnx", size, sampling=sampling) for sampling in args.sampling}
            calls = {"pytorch": functools.partial(wrapper, images)}
            for graph in graphs:
                backend, sampling = graph.split()
                calls[graph] = functools.partial(graph_runner(paths[sampling], backend, args.threads), images.numpy())
            with torch.no_grad():
                ms = dict(zip(calls, interleaved_medians(list(calls.values()), args.repeats), strict=True))
            parity = {}
            for sampling, path in paths.items():
                diff = compare_with_runtime(model, path, images, size)
                parity[sampling] = {
                    "max_abs_box_px": diff["boxes"],
                    "max_abs_score": diff["scores"],
                    "per_query": query_parity(model, images, size, tmp, sampling),
                }
            rows.append({"preset": name, "ms": {k: round(v, 1) for k, v in ms.items()}, "parity": parity})
            print(f"{name:<40} " + "   ".join(f"{k} {v:8.1f} ms" for k, v in ms.items()), flush=True)

    print(f"\n{size[0]}x{size[1]}, batch 1, {args.threads} threads, median of {args.repeats}\n")
    parity_columns = [
        f"{s}: final boxes (px) / scores | {s}: per query, same ranking: logits / boxes (px), ranked otherwise (largest gap)" for s in args.sampling
    ]
    print("| preset | PyTorch ms | " + " | ".join(f"{g} ms (speed-up)" for g in graphs) + " | " + " | ".join(parity_columns) + " |")
    print("|---|---:|" + "---:|" * len(graphs) + "---:|---:|" * len(args.sampling))
    for r in rows:
        cells = [f"{r['ms']['pytorch']:.0f}"] + [f"{r['ms'][g]:.0f} ({r['ms']['pytorch'] / r['ms'][g]:.2f}x)" for g in graphs]
        for sampling in args.sampling:
            d, q = r["parity"][sampling], r["parity"][sampling]["per_query"]
            cells += [
                f"{d['max_abs_box_px']:.1e} / {d['max_abs_score']:.1e}",
                f"{q['logits']:.1e} / {q['boxes_px']:.1e}, {q['reordered']} ({q['reordered_gap']:.1e})",
            ]
        print(f"| {r['preset']} | " + " | ".join(cells) + " |")
    report = {
        "size": list(size), "batch": 1, "threads": args.threads, "repeats": args.repeats, "sampling": args.sampling, "backends": args.backends,
        "torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "machine": platform.processor() or platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(), "load_average_after": os.getloadavg(), "rows": rows,
    }  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
