"""GPU time and memory of the deformable-attention ops: fused Triton kernels vs our PyTorch ops vs a two-pass KDA.

Token shapes of an 800x1333 image (levels 100x167, 50x84, 25x42, 13x21), d_model 256, 8 heads of 32
channels, 4 points, every token a query. Rows:

- ``msda``: ``ms_deform_attn`` through Triton and through our PyTorch op.
- ``kda`` (keys are the values, as in the Lite DETR encoder) and ``kda_distinct_key``: Triton, our
  PyTorch op, and a two-pass KDA written here (separate ``grid_sample`` passes for keys and values
  per level, stacked, then softmax, as the authors' code does).

``forward`` runs under ``torch.no_grad``; ``forward+backward`` calls ``backward`` on the output.
Times are CUDA-event medians after a warm-up; memory is the peak allocated during one call above
what was allocated before it (``torch.cuda.max_memory_allocated``).

    python benchmarks/kernels.py [--batch 1 4] [--dtype float32] [--repeats 20] [--out benchmarks/results/kernels.json]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from litedetr.nn.attention import sampling_locations
from litedetr.ops import custom_ops, encoder_reference_points, ms_deform_attn, ms_deform_attn_key_aware

LEVELS = [(100, 167), (50, 84), (25, 42), (13, 21)]
D_MODEL, HEADS, POINTS = 256, 8, 4
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
OPS = ("msda", "kda", "kda_distinct_key")


def two_pass_kda(query: Tensor, key: Tensor, value: Tensor, spatial_shapes: Tensor, locations: Tensor) -> Tensor:
    """KDA with keys and values sampled in separate passes.

    Args:
        query: ``(B, Lq, M, D)``.
        key, value: ``(B, S, M, D)``.
        spatial_shapes: ``(L, 2)``.
        locations: ``(B, Lq, M, L, P, 2)`` in [0, 1].

    Returns:
        ``(B, Lq, M*D)``.
    """
    b, s, m, d = value.shape
    _, lq, _, n_levels, p, _ = locations.shape
    shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    grids = (2 * locations - 1).transpose(1, 2).reshape(b * m, lq, n_levels, p, 2)

    def sample(feats: Tensor) -> Tensor:
        """``(B, S, M, D)`` -> ``(B*M, D, Lq, L*P)``."""
        maps = feats.permute(0, 2, 3, 1).reshape(b * m, d, s).split([h * w for h, w in shapes], -1)
        levels = [
            F.grid_sample(level.reshape(b * m, d, h, w), grids[:, :, i], mode="bilinear", padding_mode="zeros", align_corners=False)
            for i, (level, (h, w)) in enumerate(zip(maps, shapes))
        ]
        return torch.stack(levels, -2).flatten(-2)

    keys = sample(key)
    values = sample(value)
    q = query.permute(0, 2, 3, 1).reshape(b * m, d, lq, 1)
    logits = (q * keys).sum(1) / math.sqrt(d)  # (B*M, Lq, L*P)
    weights = logits.float().softmax(-1).to(values.dtype)
    out = (values * weights[:, None]).sum(-1)  # (B*M, D, Lq)
    return out.view(b, m * d, lq).transpose(1, 2)


def make_inputs(op: str, batch: int, dtype: torch.dtype, seed: int = 0) -> dict[str, Tensor]:
    """Inputs on the GPU: locations around every token's reference point, a few pixels out."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    shapes = torch.tensor(LEVELS, dtype=torch.long, device="cuda")
    s = int(shapes.prod(1).sum())
    d = D_MODEL // HEADS
    n_levels = len(LEVELS)
    reference = encoder_reference_points(shapes, torch.ones(batch, n_levels, 2, device="cuda"))
    offsets = 2.0 * torch.randn(batch, s, HEADS, n_levels, POINTS, 2, device="cuda", generator=gen)
    inputs = {
        "spatial_shapes": shapes,
        "value": torch.randn(batch, s, HEADS, d, device="cuda", generator=gen, dtype=dtype),
        "locations": sampling_locations(reference, offsets, shapes).to(dtype),
    }
    if op == "msda":
        logits = torch.randn(batch, s, HEADS, n_levels * POINTS, device="cuda", generator=gen)
        inputs["weights"] = logits.softmax(-1).view(batch, s, HEADS, n_levels, POINTS).to(dtype)
    else:
        inputs["query"] = torch.randn(batch, s, HEADS, d, device="cuda", generator=gen, dtype=dtype)
        if op == "kda_distinct_key":
            inputs["key"] = torch.randn(batch, s, HEADS, d, device="cuda", generator=gen, dtype=dtype)
    return inputs


def run_op(op: str, method: str, inputs: dict[str, Tensor]) -> Tensor:
    shapes, value, locations = inputs["spatial_shapes"], inputs["value"], inputs["locations"]
    if op == "msda":
        if method == "pytorch":
            with custom_ops.triton_disabled():
                return ms_deform_attn(value, shapes, locations, inputs["weights"])
        return ms_deform_attn(value, shapes, locations, inputs["weights"])
    key = inputs.get("key", value)
    if method == "two_pass":
        return two_pass_kda(inputs["query"], key, value, shapes, locations)
    if method == "pytorch":
        with custom_ops.triton_disabled():
            return ms_deform_attn_key_aware(inputs["query"], key, value, shapes, locations)
    return ms_deform_attn_key_aware(inputs["query"], key, value, shapes, locations)


def methods(op: str) -> list[str]:
    return ["triton", "pytorch"] if op == "msda" else ["triton", "pytorch", "two_pass"]


def forward_call(op: str, method: str, inputs: dict[str, Tensor]) -> Callable[[], None]:
    def call() -> None:
        with torch.no_grad():
            run_op(op, method, inputs)

    return call


def forward_backward_call(op: str, method: str, inputs: dict[str, Tensor], grad_out: Tensor) -> Callable[[], None]:
    leaves = {name: t.detach().requires_grad_() for name, t in inputs.items() if t.is_floating_point()}
    graph_inputs = {**inputs, **leaves}

    def call() -> None:
        for leaf in leaves.values():
            leaf.grad = None
        run_op(op, method, graph_inputs).backward(grad_out)

    return call


def median_ms(call: Callable[[], None], warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        call()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def peak_mib(call: Callable[[], None]) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    call()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def measure(call: Callable[[], None], warmup: int, repeats: int) -> tuple[float | None, float | None]:
    """``(median ms, peak MiB)``, or ``(None, None)`` when the call runs out of memory."""
    try:
        return median_ms(call, warmup, repeats), peak_mib(call)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None, None


def bench_row(op: str, method: str, batch: int, dtype: torch.dtype, warmup: int, repeats: int) -> dict[str, object]:
    inputs = make_inputs(op, batch, dtype)
    with torch.no_grad():
        out = run_op(op, method, inputs)
        reference = run_op(op, "pytorch", inputs)
        max_abs_diff = (out.float() - reference.float()).abs().max().item()
    grad_out = torch.randn_like(out)
    del out, reference
    fwd_ms, fwd_mib = measure(forward_call(op, method, inputs), warmup, repeats)
    fwd_bwd_ms, fwd_bwd_mib = measure(forward_backward_call(op, method, inputs, grad_out), warmup, repeats)
    return {
        "op": op,
        "method": method,
        "batch": batch,
        "dtype": str(dtype).removeprefix("torch."),
        "fwd_ms": fwd_ms,
        "fwd_bwd_ms": fwd_bwd_ms,
        "fwd_peak_mib": fwd_mib,
        "fwd_bwd_peak_mib": fwd_bwd_mib,
        "max_abs_diff_vs_pytorch": max_abs_diff,
    }


def markdown(rows: list[dict[str, object]]) -> str:
    def fmt(x: object) -> str:
        return "OOM" if x is None else f"{x:.1f}" if isinstance(x, float) else str(x)

    lines = [
        "| op | method | batch | dtype | fwd ms | fwd+bwd ms | fwd peak MiB | fwd+bwd peak MiB | max abs diff vs pytorch |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        cells = [r["op"], r["method"], r["batch"], r["dtype"], r["fwd_ms"], r["fwd_bwd_ms"], r["fwd_peak_mib"], r["fwd_bwd_peak_mib"]]
        lines.append("| " + " | ".join(fmt(c) for c in cells) + f" | {r['max_abs_diff_vs_pytorch']:.2e} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4], help="batch sizes (default: 1 4)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "kernels.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/kernels.py needs a CUDA GPU and none is available")
    if not custom_ops.triton_enabled():
        sys.exit("benchmarks/kernels.py needs Triton (pip install triton) and it is not installed")

    dtype = DTYPES[args.dtype]
    rows = []
    for batch in args.batch:
        for op in OPS:
            for method in methods(op):
                rows.append(bench_row(op, method, batch, dtype, args.warmup, args.repeats))
                torch.cuda.empty_cache()
    table = markdown(rows)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": importlib.metadata.version("triton"),
        "levels": LEVELS,
        "d_model": D_MODEL,
        "heads": HEADS,
        "points": POINTS,
        "warmup": args.warmup,
        "repeats": args.repeats,
    }
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
