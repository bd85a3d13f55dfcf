"""``litedetr flops``: GFLOPs of a preset per component (:mod:`litedetr.bench.flops` counts them)."""

from __future__ import annotations

import argparse
import json

from litedetr.bench.flops import COMPONENTS, DEFAULT_SIZE, FlopReport, count_flops
from litedetr.tools.args import parse_size

__all__ = ["format_report", "add_arguments"]


def format_report(report: FlopReport) -> str:
    """A human-readable table of the report (GFLOPs per component, tokens, encoder queries)."""
    lines = [f"{report.model} at {report.size[0]}x{report.size[1]} (batch 1; one multiply-add = one FLOP)"]
    width = max(len(c) for c in (*COMPONENTS, "total"))
    for component, gflops in report.components.items():
        lines.append(f"  {component:<{width}}  {gflops:9.3f} GFLOPs  {gflops / report.total:6.1%}")
    if report.other:
        lines.append(f"  {'other':<{width}}  {report.other:9.3f} GFLOPs")
    lines.append(f"  {'total':<{width}}  {report.total:9.3f} GFLOPs")
    strides = [8 * 2**i for i in range(len(report.spatial_shapes))]
    lines.append("tokens per level (stride: HxW = tokens): " + ", ".join(f"{s}: {h}x{w} = {h * w}" for s, (h, w) in zip(strides, report.spatial_shapes)))
    lines.append("queries per encoder layer: " + ", ".join(str(s.num_queries) for s in report.schedule))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    report = count_flops(args.model, args.size)
    print(json.dumps(report.to_dict()) if args.json else format_report(report))
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``litedetr flops``; sets ``func``."""
    p.add_argument("--model", required=True, help="model preset, e.g. lite-dino-r50-h3l1-2x3 (see `litedetr models`)")
    p.add_argument("--size", type=parse_size, default=DEFAULT_SIZE, help="image size HxW, fed as is (default 850x1040, the authors')")
    p.add_argument("--json", action="store_true", help="print one JSON object (GFLOPs as numbers)")
    p.set_defaults(func=run)
