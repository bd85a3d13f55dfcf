"""CPU latency of exported ONNX graphs in onnxruntime vs the same detectors in PyTorch, side by side.

For each preset (random weights; latency does not depend on them): export at ``--size``, then time
PyTorch (eval, no autograd: the gather path of the deformable attention) and onnxruntime (CPU
provider) on one synthetic scene, both with ``--threads`` intra-op threads, median of ``--repeats``
after one warm-up, the two runs taking turns. The class heads are redrawn as a trained model's spread
their logits (:func:`~litedetr.tools.export.spread_class_logits`). Reports the max abs difference of the
final boxes (pixels) and scores between the two, and, per query before any top-k, given the same ranking
of the encoder's proposals (:func:`~litedetr.tools.export.query_parity`): the logits' and boxes'
differences, and how many query positions the two rank otherwise, with the largest score gap among them
(near-ties below float32 rounding, which DINO-style models turn into other final detections).

    python benchmarks/onnx_speed.py [--size 480x640] [--repeats 5] [--threads 2] [--out benchmarks/results/onnx_speed.json]
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import onnxruntime
import torch

from litedetr import build_model
from litedetr.tools.export import (
    OUTPUT_NAMES,
    OnnxDetector,
    compare_with_runtime,
    export_onnx,
    normalized_scene,
    onnx_session,
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
    parser.add_argument("--out", default="benchmarks/results/onnx_speed.json")
    args = parser.parse_args()
    size = tuple(int(v) for v in args.size.split("x"))
    torch.set_num_threads(args.threads)
    images = normalized_scene(1, *size, seed=0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in PRESETS:
            torch.manual_seed(0)
            model = spread_class_logits(build_model(name).eval())
            wrapper = OnnxDetector(model, size).eval()
            path = export_onnx(model, Path(tmp) / f"{name}.onnx", size)
            session = onnx_session(path, threads=args.threads)
            feed = {"images": images.numpy()}
            with torch.no_grad():
                calls = [functools.partial(wrapper, images), functools.partial(session.run, list(OUTPUT_NAMES), feed)]
                torch_ms, ort_ms = interleaved_medians(calls, args.repeats)
            diff = compare_with_runtime(model, path, images, size)
            parity = query_parity(model, images, size, tmp)
            rows.append({"preset": name, "pytorch_ms": round(torch_ms, 1), "onnxruntime_ms": round(ort_ms, 1),
                         "speedup": round(torch_ms / ort_ms, 2), "max_abs_box_px": diff["boxes"],
                         "max_abs_score": diff["scores"], "per_query": parity})  # fmt: skip
            print(f"{name:<40} PyTorch {torch_ms:8.1f} ms   onnxruntime {ort_ms:8.1f} ms   ({torch_ms / ort_ms:.2f}x)", flush=True)

    print(f"\n{size[0]}x{size[1]}, batch 1, {args.threads} threads, median of {args.repeats}\n")
    print(
        "| preset | PyTorch | onnxruntime | onnxruntime speed-up | final boxes (px) / scores "
        "| per query, same ranking: logits / boxes (px) | ranked otherwise (largest score gap) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        q = r["per_query"]
        print(f"| {r['preset']} | {r['pytorch_ms']:.0f} ms | {r['onnxruntime_ms']:.0f} ms | {r['speedup']:.2f}x "
              f"| {r['max_abs_box_px']:.1e} / {r['max_abs_score']:.1e} | {q['logits']:.1e} / {q['boxes_px']:.1e} "
              f"| {q['reordered']} ({q['reordered_gap']:.1e}) |")  # fmt: skip
    report = {
        "size": list(size), "batch": 1, "threads": args.threads, "repeats": args.repeats,
        "torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "machine": platform.processor() or platform.machine(),
        "rows": rows,
    }  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
