"""CPU speed of the core: our KDA op vs a two-pass KDA, and the Lite encoder vs the standard encoder.

Token shapes of an 800x1333 image (levels 100x167, 50x84, 25x42, 13x21), batch 1, d_model 256,
8 heads, 4 points, every token a query. All rows are measured side by side in one run; peak memory
is what one call allocates at its peak beyond its inputs (the profiler's allocation events, as
``litedetr bench`` measures it). Rows without
autograd run on both CPU backends of :mod:`litedetr.ops`: ``[kernel]`` the fused C++ kernels,
``[pytorch]`` the PyTorch implementation (``embedding_bag`` gathers).

    python benchmarks/encoder_speed.py [--repeats 5] [--out benchmarks/results/encoder_speed.json]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from litedetr.nn import DeformableEncoder, LiteEncoder
from litedetr.ops import cpu_kernels, ms_deform_attn_key_aware
from litedetr.tools.bench import peak_memory

SHAPES = torch.tensor([[100, 167], [50, 84], [25, 42], [13, 21]])
D_MODEL, HEADS, POINTS = 256, 8, 4


def two_pass_kda(query, key, value, spatial_shapes, sampling_locations):
    """KDA as the authors' code computes it: separate grid_sample passes for keys and values, stacked."""
    b, _, m, d = value.shape
    _, lq, _, n_levels, p, _ = sampling_locations.shape
    sizes = [int(h * w) for h, w in spatial_shapes]
    grids = 2 * sampling_locations - 1
    keys, values = [], []
    for lvl, ((h, w), k_l, v_l) in enumerate(zip(spatial_shapes.tolist(), key.split(sizes, 1), value.split(sizes, 1))):
        grid = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)
        for feats, out in ((k_l, keys), (v_l, values)):
            level_map = feats.flatten(2).transpose(1, 2).reshape(b * m, d, h, w)
            out.append(F.grid_sample(level_map, grid, mode="bilinear", padding_mode="zeros", align_corners=False))
    k = torch.stack(keys, -2).flatten(-2).permute(0, 2, 3, 1).flatten(0, 1)  # (B*M*Lq, L*P, D)
    v = torch.stack(values, -2).flatten(-2).permute(0, 2, 3, 1).flatten(0, 1)
    q = query.permute(0, 2, 1, 3).reshape(b * m * lq, 1, d)
    weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d), -1)
    return (weights @ v).view(b, m, lq, d).permute(0, 2, 1, 3).flatten(2)


def op_inputs(seed: int = 0, requires_grad: bool = False, shared_key: bool = True):
    g = torch.Generator().manual_seed(seed)
    s = int(SHAPES.prod(1).sum())
    d = D_MODEL // HEADS
    value = torch.randn(1, s, HEADS, d, generator=g)
    key = value if shared_key else torch.randn(1, s, HEADS, d, generator=g)
    query = torch.randn(1, s, HEADS, d, generator=g)
    locations = torch.rand(1, s, HEADS, len(SHAPES), POINTS, 2, generator=g)
    tensors = [query, key, value, locations]
    if requires_grad:
        for t in {id(t): t for t in tensors}.values():
            t.requires_grad_()
    return tensors


def encoder(kind: str) -> torch.nn.Module:
    if kind == "standard":
        return DeformableEncoder(6, D_MODEL, 4, HEADS, POINTS, d_ffn=2048, key_aware=False).eval()
    return LiteEncoder(3, 2, 3, D_MODEL, 4, HEADS, POINTS, d_ffn=2048, d_ffn_low=256, key_aware=True).eval()


def encoder_inputs():
    g = torch.Generator().manual_seed(0)
    s = int(SHAPES.prod(1).sum())
    return torch.randn(1, s, D_MODEL, generator=g), torch.randn(1, s, D_MODEL, generator=g), torch.ones(1, 4, 2)


def make_case(name: str) -> Callable[[], object]:
    """A zero-argument callable running one benchmark row (on the PyTorch backend for ``[pytorch]`` rows)."""
    run = _case(name)
    if "[pytorch]" not in name:
        return run

    def on_pytorch() -> object:
        with cpu_kernels.cpu_kernels_disabled():
            return run()

    return on_pytorch


def _case(name: str) -> Callable[[], object]:
    if name.startswith("kda"):
        op = ms_deform_attn_key_aware if "ours" in name else two_pass_kda
        shared = "distinct" not in name
        if name.endswith("fwd+bwd"):
            inputs = op_inputs(requires_grad=True, shared_key=shared)

            def run():
                op(inputs[0], inputs[1], inputs[2], SHAPES, inputs[3]).sum().backward()

            return run
        inputs = op_inputs(shared_key=shared)
        return lambda: torch.no_grad()(op)(inputs[0], inputs[1], inputs[2], SHAPES, inputs[3])
    model = encoder(name.split()[0])  # "standard" or "lite"
    src, pos, ratios = encoder_inputs()
    return lambda: torch.no_grad()(model)(src, pos, SHAPES, ratios)


def time_case(run: Callable[[], object], repeats: int) -> list[float]:
    run()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return times


STANDARD = "standard encoder (6 layers, MSDA, FFN 2048) fwd"
LITE = "lite encoder H3L1-(2+1)x3 (KDA, FFN 2048/256) fwd"
ROWS = [
    "kda two-pass fwd",
    "kda ours fwd [kernel]",
    "kda ours fwd [pytorch]",
    "kda two-pass fwd+bwd",
    "kda ours fwd+bwd",
    "kda two-pass distinct-key fwd",
    "kda ours distinct-key fwd [kernel]",
    "kda ours distinct-key fwd [pytorch]",
    f"{STANDARD} [kernel]",
    f"{LITE} [kernel]",
    f"{STANDARD} [pytorch]",
    f"{LITE} [pytorch]",
]


def check_outputs_agree() -> float:
    with torch.no_grad():
        q, k, v, loc = op_inputs()
        return (ms_deform_attn_key_aware(q, k, v, SHAPES, loc) - two_pass_kda(q, k, v, SHAPES, loc)).abs().max().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "encoder_speed.json")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-row peak-memory measurement")
    args = parser.parse_args()

    max_err = check_outputs_agree()
    results = {}
    for name in ROWS:
        times = time_case(make_case(name), args.repeats)
        results[name] = {"median_s": statistics.median(times), "min_s": min(times)}
        if not args.no_memory:
            results[name]["peak_mb"] = peak_memory(make_case(name), torch.device("cpu")) / 2**20
        print(f"{name:55s} {results[name]['median_s'] * 1e3:9.1f} ms", flush=True)

    def ratio(a: str, b: str) -> float:
        return results[a]["median_s"] / results[b]["median_s"]

    summary = {
        "kda_fwd_speedup_kernel": ratio("kda two-pass fwd", "kda ours fwd [kernel]"),
        "kda_fwd_speedup_pytorch": ratio("kda two-pass fwd", "kda ours fwd [pytorch]"),
        "kda_fwd_bwd_speedup": ratio("kda two-pass fwd+bwd", "kda ours fwd+bwd"),
        "kda_distinct_key_fwd_speedup_kernel": ratio("kda two-pass distinct-key fwd", "kda ours distinct-key fwd [kernel]"),
        "kda_distinct_key_fwd_speedup_pytorch": ratio("kda two-pass distinct-key fwd", "kda ours distinct-key fwd [pytorch]"),
        "lite_over_standard_encoder_latency_kernel": ratio(f"{LITE} [kernel]", f"{STANDARD} [kernel]"),
        "lite_over_standard_encoder_latency_pytorch": ratio(f"{LITE} [pytorch]", f"{STANDARD} [pytorch]"),
        "kda_max_abs_diff_vs_two_pass": max_err,
    }
    print("\n| row | median ms | peak MB |\n|---|---:|---:|")
    for name, r in results.items():
        print(f"| {name} | {r['median_s'] * 1e3:.1f} | {r.get('peak_mb', float('nan')):.0f} |")
    print()
    for key, value in summary.items():
        print(f"{key}: {value:.3g}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(), "repeats": args.repeats}
    args.out.write_text(json.dumps({"meta": meta, "rows": results, "summary": summary}, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
