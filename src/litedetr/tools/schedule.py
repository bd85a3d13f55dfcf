"""``litedetr schedule``: which tokens are queries in each encoder layer, for an image size."""

from __future__ import annotations

import argparse
import json

from litedetr.tools.args import int_at_least, size_type

__all__ = ["add_arguments", "run"]


def run(args: argparse.Namespace) -> int:
    import torch

    from litedetr.models.backbone import level_sizes
    from litedetr.nn import DeformableEncoder, LiteEncoder

    shapes = torch.tensor(level_sizes(*args.size, args.levels))
    if args.high is None:
        encoder = DeformableEncoder(num_layers=args.blocks * args.updates, d_model=32, n_levels=args.levels, n_heads=1, d_ffn=1)
        title = f"standard deformable encoder, {len(encoder.layers)} layers"
    else:
        encoder = LiteEncoder(args.high, args.updates, args.blocks, d_model=32, n_levels=args.levels, n_heads=1, d_ffn=1, d_ffn_low=1)
        title = f"Lite encoder H{args.high}L{args.levels - args.high}-({args.updates}+1)x{args.blocks}"
    schedule = encoder.schedule(shapes)
    if args.json:
        print(json.dumps({"levels": shapes.tolist(), "layers": [vars(s) for s in schedule]}))
        return 0
    sizes = shapes.prod(1).tolist()
    strides = [8 * 2**i for i in range(args.levels)]
    print(f"{title} at {args.size[0]}x{args.size[1]}")
    print("tokens per level (stride: HxW = tokens): " + ", ".join(f"{s}: {h}x{w} = {n}" for s, (h, w), n in zip(strides, shapes.tolist(), sizes)))
    print(f"{'layer':>5}  {'query levels':>12}  {'queries':>8}  {'share':>6}  {'narrow FFN':>10}")
    for step in schedule:
        levels = ",".join(str(strides[i]) for i in range(step.first_level, args.levels))
        print(f"{step.layer:>5}  {levels:>12}  {step.num_queries:>8}  {step.num_queries / step.num_tokens:>6.1%}  {step.narrow_ffn_tokens:>10}")
    total = sum(s.num_queries for s in schedule)
    print(f"query-token updates: {total} ({total / (len(schedule) * sum(sizes)):.1%} of a standard encoder of equal depth)")
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``litedetr schedule``; sets ``func``."""
    p.add_argument("--size", type=size_type(1), default=(800, 1333), help="image size HxW (default 800x1333)")
    p.add_argument("--high", type=int_at_least(1), default=3, help="H: number of high-level (coarsest) scales")
    p.add_argument("--standard", dest="high", action="store_const", const=None, help="the standard encoder instead")
    p.add_argument("--updates", type=int_at_least(1), default=2, help="A: high-level updates per block")
    p.add_argument("--blocks", type=int_at_least(1), default=3, help="B: number of blocks")
    p.add_argument("--levels", type=int_at_least(1), default=4, help="number of feature levels (default 4)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)
