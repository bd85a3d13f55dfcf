"""GPU time and memory of the deformable-attention ops: fused Triton kernels vs our PyTorch ops vs a two-pass KDA.

Token shapes of an 800x1333 image (levels 100x167, 50x84, 25x42, 13x21), d_model 256, 8 heads of 32
channels, 4 points, every token a query, locations a few pixels around each token. Rows (see
:mod:`litedetr.engine.attention_bench`): ``msda``, ``kda`` (keys are the values, as in the Lite DETR
encoder) and ``kda_distinct_key``, each through ``ours`` (Triton on CUDA), ``pytorch`` (our op with
the kernels off) and, for KDA, ``two_pass`` (the authors' way: keys and values sampled in separate
``grid_sample`` passes). Forward under ``torch.no_grad``, and forward + backward; median and 90th
percentile over the timed runs (CUDA synchronised around each), peak memory beyond the inputs.
``benchmarks/gpu_check.py`` runs the batch-1 rows with the rest of the GPU checks.

    python benchmarks/kernels.py [--batch 1 4] [--dtype float32 bfloat16] [--repeats 20] [--out benchmarks/results/kernels.json]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import sys
from pathlib import Path

import torch

from litedetr.ops import custom_ops
from litedetr.engine.attention_bench import D_MODEL, HEADS, LEVELS_800X1333, POINTS, kernel_cases, kernel_markdown, kernel_row

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4], help="batch sizes (default: 1 4)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), nargs="+", default=["float32"])
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "kernels.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/kernels.py needs a CUDA GPU and none is available")
    if not custom_ops.triton_enabled():
        sys.exit("benchmarks/kernels.py needs Triton (pip install triton) and it is not installed")

    device = torch.device("cuda")
    rows = []
    for case in kernel_cases(args.batch, [DTYPES[d] for d in args.dtype]):
        rows.append(kernel_row(case, LEVELS_800X1333, device, args.repeats, args.warmup))
        torch.cuda.empty_cache()
    print(kernel_markdown(rows))
    meta = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": importlib.metadata.version("triton"),
        "levels": LEVELS_800X1333,
        "d_model": D_MODEL,
        "heads": HEADS,
        "points": POINTS,
        "warmup": args.warmup,
        "repeats": args.repeats,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
