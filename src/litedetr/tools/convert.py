"""``litedetr convert``: a checkpoint of the authors' Lite-DINO, DINO, Deformable DETR or H-DETR as a litedetr model file."""

from __future__ import annotations

import argparse

from litedetr.tools.args import int_at_least
from litedetr.weights import WEIGHTS, load_checkpoint, save_model

__all__ = ["add_arguments", "run"]


def run(args: argparse.Namespace) -> int:
    overrides = {"num_classes": args.num_classes} if args.num_classes is not None else {}
    save_model(load_checkpoint(args.checkpoint, args.preset, weights=args.weights, **overrides), args.out)
    print(f"wrote {args.out} ({args.preset})")
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``litedetr convert``; sets ``func``."""
    p.add_argument("checkpoint", help="the .pth file (a state dict, bare or under model / state_dict / an EMA's key; DDP's module. prefix is fine)")
    p.add_argument(
        "--preset",
        required=True,
        help="the preset it was trained as (e.g. lite-dino-r50-h3l1-2x3, deformable-detr-r50), "
        "or a Lite preset of its family to start one from a standard checkpoint",
    )
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--num-classes", type=int_at_least(1), help="class count if not the preset's (91)")
    p.add_argument("--weights", choices=WEIGHTS, default="auto", help="of a checkpoint holding a model and its EMA: the EMA (auto, ema) or the model")
    p.set_defaults(func=run)
