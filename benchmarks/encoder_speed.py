"""CPU speed of the core: our KDA op vs a two-pass KDA, and the Lite encoder vs the standard encoder.

Token shapes of an 800x1333 image (levels 100x167, 50x84, 25x42, 13x21), batch 1, d_model 256,
8 heads, 4 points, every token a query, sampling locations uniform over the maps
(:mod:`litedetr.bench.attention`, which also holds the two-pass KDA). All rows are measured side by side in one run; peak memory
is what one call allocates at its peak beyond its inputs (the profiler's allocation events, as
``litedetr bench`` measures it). Rows without
autograd run on both CPU backends of :mod:`litedetr.ops`: ``[kernel]`` the fused C++ kernels,
``[pytorch]`` the PyTorch implementation (``embedding_bag`` gathers).

    python benchmarks/encoder_speed.py [--repeats 5] [--out benchmarks/results/encoder_speed.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from collections.abc import Callable
from pathlib import Path

import torch

from litedetr.bench.attention import D_MODEL, HEADS, LEVELS_800X1333, POINTS, attention_call, attention_inputs, run_attention
from litedetr.bench.timing import peak_memory, time_calls
from litedetr.nn import DeformableEncoder, LiteEncoder
from litedetr.ops import cpu_kernels

SHAPES = torch.tensor(LEVELS_800X1333)


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
        op = "kda_distinct_key" if "distinct" in name else "kda"
        inputs = attention_inputs(op, LEVELS_800X1333, near_reference=False)
        return attention_call(op, "ours" if "ours" in name else "two_pass", inputs, backward=name.endswith("fwd+bwd"))
    model = encoder(name.split()[0])  # "standard" or "lite"
    src, pos, ratios = encoder_inputs()
    return lambda: torch.no_grad()(model)(src, pos, SHAPES, ratios)


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
    inputs = attention_inputs("kda", LEVELS_800X1333, near_reference=False)
    with torch.no_grad():
        return (run_attention("kda", "ours", inputs) - run_attention("kda", "two_pass", inputs)).abs().max().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "encoder_speed.json")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-row peak-memory measurement")
    args = parser.parse_args()

    max_err = check_outputs_agree()
    results = {}
    for name in ROWS:
        times = time_calls(make_case(name), torch.device("cpu"), args.repeats)
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
