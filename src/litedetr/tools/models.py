"""``litedetr models``: the named model presets."""

from __future__ import annotations

import argparse
import json
import sys

from litedetr.models import PRESETS
from litedetr.models.config import EncoderConfig, suggest_presets

__all__ = ["add_arguments", "run", "encoder_label"]


def encoder_label(encoder: EncoderConfig, n_levels: int) -> str:
    """``standard x6, MSDA`` or ``H3L1-(2+1)x3, KDA``."""
    attention = "KDA" if encoder.key_aware else "MSDA"
    if encoder.kind == "standard":
        return f"standard x{encoder.num_layers}, {attention}"
    return f"H{encoder.n_high}L{n_levels - encoder.n_high}-({encoder.high_updates}+1)x{encoder.blocks}, {attention}"


def run(args: argparse.Namespace) -> int:
    rows = [
        (name, c.family, c.backbone, encoder_label(c.encoder, c.num_levels), str(c.num_queries), f"{max(c.min_size)}/{c.max_size}")
        for name, c in sorted(PRESETS.items())
        if args.filter is None or args.filter in name
    ]
    if not rows:
        print(f"litedetr: no preset name contains {args.filter!r}; {suggest_presets(args.filter)}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({name: PRESETS[name].to_dict() for name, *_ in rows}))
        return 0
    header = ("preset", "family", "backbone", "encoder", "queries", "image short/long")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``litedetr models``; sets ``func``."""
    p.add_argument("filter", nargs="?", help="only presets whose name contains this text")
    p.add_argument("--json", action="store_true", help="print the full configs as JSON")
    p.set_defaults(func=run)
