"""Time and memory of the deformable-attention ops: on a GPU, fused Triton kernels vs our PyTorch ops vs a
two-pass KDA; on the CPU (``--device cpu``), forward + backward of the fused C++ kernels vs the ``grid_sample`` path.

Token shapes of an 800x1333 image (levels 100x167, 50x84, 25x42, 13x21), d_model 256, 8 heads of 32
channels, 4 points, every token a query, locations a few pixels around each token. Rows (see
:mod:`litedetr.bench.attention`): ``msda``, ``kda`` (keys are the values, as in the Lite DETR
encoder) and ``kda_distinct_key``.

GPU (default): each op through ``ours`` (Triton on CUDA), ``pytorch`` (our op with the kernels off)
and, for KDA, ``two_pass`` (the authors' way: keys and values sampled in separate ``grid_sample``
passes). Forward under ``torch.no_grad``, and forward + backward; median and 90th percentile over the
timed runs (CUDA synchronised around each), peak memory beyond the inputs. ``benchmarks/gpu_check.py``
runs the batch-1 rows with the rest of the GPU checks.

CPU (``--device cpu``): forward + backward (gradients of every float input) of each op in float32
through the fused C++ kernels (``litedetr::cpu_*`` custom ops) and through the ``grid_sample`` path,
timed alternately call by call in one process (:func:`~litedetr.bench.attention.fused_backward_row`),
and the peak tensor memory of one call beyond its inputs (the profiler's allocation events). Writes
``kernels_cpu.json`` and ``kernels_cpu.md`` beside ``--out``'s default, with the thread count, the load
averages before and after, and ``--note`` (say there whether other jobs shared the cores).

    python benchmarks/kernels.py [--batch 1 4] [--dtype float32 bfloat16] [--repeats 20] [--out benchmarks/results/kernels.json]
    python benchmarks/kernels.py --device cpu [--batch 1] [--repeats 5] [--threads 2] [--note "..."]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import sys
from pathlib import Path

import torch

from litedetr.bench.attention import (
    D_MODEL,
    HEADS,
    LEVELS_800X1333,
    OPS,
    POINTS,
    fused_backward_markdown,
    fused_backward_row,
    kernel_cases,
    kernel_markdown,
    kernel_row,
)
from litedetr.bench.timing import load_averages
from litedetr.ops import cpu_kernels, custom_ops

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
RESULTS = Path(__file__).parent / "results"
CPU_TARGETS = {"kda": (4.0, 0.5), "kda_distinct_key": (4.0, 0.5), "msda": (2.0, None)}
"""Issue 24's targets per op: fused fwd+bwd at least this many times faster than ``grid_sample``, and (KDA) at most this fraction of its peak memory."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--batch", type=int, nargs="+", default=None, help="batch sizes (default: 1 4 on a GPU, 1 on the CPU)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), nargs="+", default=["float32"], help="GPU only; the CPU rows are float32")
    parser.add_argument("--warmup", type=int, default=None, help="default: 5 on a GPU, 1 on the CPU")
    parser.add_argument("--repeats", type=int, default=None, help="default: 20 on a GPU, 5 on the CPU")
    parser.add_argument("--threads", type=int, default=None, help="CPU: torch's intra-op threads (default: torch's)")
    parser.add_argument("--note", default="", help="CPU: recorded in the results (e.g. that the cores were shared with other jobs)")
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/kernels.json (GPU) or kernels_cpu.json (CPU)")
    args = parser.parse_args()
    if args.device == "cpu":
        run_cpu(args)
    else:
        run_gpu(args)


def run_gpu(args: argparse.Namespace) -> None:
    if not torch.cuda.is_available():
        sys.exit("benchmarks/kernels.py needs a CUDA GPU and none is available (--device cpu times the CPU kernels)")
    if not custom_ops.triton_enabled():
        sys.exit("benchmarks/kernels.py needs Triton (pip install triton) and it is not installed")
    repeats, warmup = args.repeats or 20, 5 if args.warmup is None else args.warmup
    device = torch.device("cuda")
    rows = []
    for case in kernel_cases(args.batch or [1, 4], [DTYPES[d] for d in args.dtype]):
        rows.append(kernel_row(case, LEVELS_800X1333, device, repeats, warmup))
        torch.cuda.empty_cache()
    print(kernel_markdown(rows))
    meta = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": importlib.metadata.version("triton"),
        **_shapes_meta(warmup, repeats),
    }
    out = _write_json(args.out or RESULTS / "kernels.json", meta, rows)
    print(f"\nwrote {out}")


def _shapes_meta(warmup: int, repeats: int) -> dict[str, object]:
    """The op shapes and the timing counts every run records."""
    return {"levels": LEVELS_800X1333, "d_model": D_MODEL, "heads": HEADS, "points": POINTS, "warmup": warmup, "repeats": repeats}


def _write_json(out: Path, meta: dict[str, object], rows: list[dict[str, object]]) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    return out


def _targets(row: dict[str, object]) -> dict[str, object]:
    speedup, memory = CPU_TARGETS[row["op"]]
    met = row["speedup"] >= speedup and (memory is None or row["memory_ratio"] <= memory)
    return {"speedup_at_least": speedup, "memory_ratio_at_most": memory, "met": met}


def run_cpu(args: argparse.Namespace) -> None:
    if not cpu_kernels.enabled(torch.zeros(1)):
        sys.exit("benchmarks/kernels.py --device cpu needs the C++ CPU kernels, which are switched off or could not be built")
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats, warmup = args.repeats or 5, 1 if args.warmup is None else args.warmup
    load_before = os.getloadavg()
    rows = []
    for batch in args.batch or [1]:
        for op in OPS:
            row = fused_backward_row(op, LEVELS_800X1333, batch, repeats, warmup)
            row["target"] = _targets(row)
            rows.append(row)
            print(fused_backward_markdown([row]).splitlines()[-1], flush=True)
    meta = {
        "device": "cpu",
        "cpu": platform.processor() or platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "note": args.note,
        "torch": torch.__version__,
        **_shapes_meta(warmup, repeats),
        "timing": "alternating: each repeat runs the fused and the grid_sample call, in alternating order",
        "peak_memory": "most tensor memory one call holds beyond its inputs (torch.profiler allocation events; output and gradients included)",
    }
    table = fused_backward_markdown(rows)
    print("\n" + table)
    out = _write_json(args.out or RESULTS / "kernels_cpu.json", meta, rows)
    out.with_suffix(".md").write_text(_cpu_markdown(meta, table))
    print(f"\nwrote {out} and {out.with_suffix('.md')}")


def _cpu_markdown(meta: dict[str, object], table: str) -> str:
    load = load_averages(meta["load_average_before"]) + " before, " + load_averages(meta["load_average_after"]) + " after"
    lines = [
        "# Deformable attention on the CPU: fused C++ forward + backward vs the grid_sample path",
        "",
        f"`python benchmarks/kernels.py --device cpu`: token shapes of an 800x1333 image ({sum(h * w for h, w in LEVELS_800X1333)} tokens, "
        f"every token a query), d_model {D_MODEL}, {HEADS} heads, {POINTS} points, float32, gradients of every float input. "
        f"{meta['threads']} threads on {meta['cpu_count']} cores ({meta['cpu_capability']}); load averages (1, 5, 15 min) {load}. "
        f"{meta['repeats']} timed calls per path after {meta['warmup']} untimed, alternating. {meta['peak_memory'].capitalize()}.",
        "",
    ]
    if meta["note"]:
        lines += [f"**Note:** {meta['note']}", ""]
    after = [
        "",
        "The difference columns compare the fused path's output and gradients with the grid_sample path's, each relative to that "
        "tensor's largest magnitude. A location gradient can differ by O(1) where a sample lies within float32 rounding of a cell "
        "centre: the bilinear derivative jumps there, and the two paths round the pixel coordinate differently "
        "(`x * W - 0.5` against grid_sample's `(((2x - 1) + 1) * W - 1) / 2`), so they take opposite one-sided derivatives.",
        "",
    ]
    return "\n".join([*lines, table, *after])


if __name__ == "__main__":
    main()
