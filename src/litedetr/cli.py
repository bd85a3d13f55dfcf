"""Command-line interface: ``litedetr COMMAND ...``."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from typing import TYPE_CHECKING

from litedetr import __version__
from litedetr.tools.args import int_at_least, size_type

CHECKPOINT_WEIGHTS = ("auto", "ema", "model")
"""``litedetr.models.checkpoint.WEIGHTS``, spelled here so that ``litedetr --help`` does not import torch."""

if TYPE_CHECKING:
    import torch

    from litedetr.models.config import EncoderConfig

# torch and the models are imported by the command that runs, not here: `litedetr --help` stays fast.


def _level_shapes(h: int, w: int, n_levels: int) -> torch.Tensor:
    """Map sizes of strides 8, 16, ... as ResNet (ceil at every stride-2 step) and the extra stride-2 conv produce them."""
    import torch

    shapes = []
    for _ in range(3):  # stem+pool (/4) then stride-2 stages down to /8
        h, w = -(-h // 2), -(-w // 2)
    for _ in range(n_levels):
        shapes.append((h, w))
        h, w = -(-h // 2), -(-w // 2)
    return torch.tensor(shapes)


def cmd_schedule(args: argparse.Namespace) -> int:
    from litedetr.nn import DeformableEncoder, LiteEncoder

    shapes = _level_shapes(*args.size, args.levels)
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


def _encoder_label(enc: EncoderConfig, n_levels: int) -> str:
    attention = "KDA" if enc.key_aware else "MSDA"
    if enc.kind == "standard":
        return f"standard x{enc.num_layers}, {attention}"
    return f"H{enc.n_high}L{n_levels - enc.n_high}-({enc.high_updates}+1)x{enc.blocks}, {attention}"


def cmd_models(args: argparse.Namespace) -> int:
    from litedetr.models import PRESETS
    from litedetr.models.config import suggest_presets

    rows = [
        (name, c.family, c.backbone, _encoder_label(c.encoder, c.n_levels), str(c.num_queries), f"{max(c.min_size)}/{c.max_size}")
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


def cmd_convert(args: argparse.Namespace) -> int:
    from litedetr.models import convert_official_checkpoint

    overrides = {"num_classes": args.num_classes} if args.num_classes is not None else {}
    convert_official_checkpoint(args.checkpoint, args.preset, args.out, args.weights, **overrides)
    print(f"wrote {args.out} ({args.preset})")
    return 0


TOOL_COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("litedetr.tools.train", "train a detector on a COCO-format dataset (default: the synthetic one)"),
    "eval": ("litedetr.tools.evaluate", "COCO box AP of a model file on a COCO-format dataset"),
    "demo": ("litedetr.tools.demo", "build the synthetic dataset, train a small Lite-DINO on the CPU, evaluate, draw predictions"),
    "predict": ("litedetr.tools.predict", "detect objects in images; write predictions.json and annotated PNGs"),
    "export": ("litedetr.tools.export", "export a detector to ONNX (normalised images -> boxes, scores, labels)"),
    "explain": ("litedetr.tools.explain", "draw where an encoder token samples (per layer and level) and the token schedule"),
    "flops": ("litedetr.tools.flops", "GFLOPs per component (backbone, encoder, decoder, ...) at an image size"),
    "bench": ("litedetr.tools.bench", "latency, images/s and peak memory of a model and of its encoder"),
}
"""Command -> (module whose ``add_arguments(parser)`` defines it and sets ``func``, one-line help)."""


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; of the commands in :data:`TOOL_COMMANDS` only ``command``'s module is imported
    (``None``: all of them), the others are listed by name and help."""
    parser = argparse.ArgumentParser(prog="litedetr", description="Lite DETR: efficient multi-scale DETR encoders.")
    parser.add_argument("--version", action="version", version=f"litedetr {__version__}")
    verbosity = argparse.ArgumentParser(add_help=False)
    loudness = verbosity.add_mutually_exclusive_group()
    loudness.add_argument("-q", "--quiet", dest="log_level", action="store_const", const=logging.WARNING, help="only warnings and errors")
    loudness.add_argument("-v", "--verbose", dest="log_level", action="store_const", const=logging.DEBUG, help="also debugging messages")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("schedule", parents=[verbosity], help="which tokens are queries in each encoder layer, for an image size")
    p.add_argument("--size", type=size_type(1), default=(800, 1333), help="image size HxW (default 800x1333)")
    p.add_argument("--high", type=int_at_least(1), default=3, help="H: number of high-level (coarsest) scales")
    p.add_argument("--standard", dest="high", action="store_const", const=None, help="the standard encoder instead")
    p.add_argument("--updates", type=int_at_least(1), default=2, help="A: high-level updates per block")
    p.add_argument("--blocks", type=int_at_least(1), default=3, help="B: number of blocks")
    p.add_argument("--levels", type=int_at_least(1), default=4, help="number of feature levels (default 4)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_schedule)

    p = sub.add_parser("models", parents=[verbosity], help="list the named model presets")
    p.add_argument("filter", nargs="?", help="only presets whose name contains this text")
    p.add_argument("--json", action="store_true", help="print the full configs as JSON")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser(
        "convert", parents=[verbosity], help="convert a checkpoint (.pth) of the authors' Lite-DINO, DINO, Deformable DETR or H-DETR into a litedetr model file"
    )
    p.add_argument("checkpoint", help="the .pth file (a state dict, bare or under model / state_dict / an EMA's key; DDP's module. prefix is fine)")
    p.add_argument(
        "--preset",
        required=True,
        help="the preset it was trained as (e.g. lite-dino-r50-h3l1-2x3, deformable-detr-r50), "
        "or a Lite preset of its family to start one from a standard checkpoint",
    )
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--num-classes", type=int_at_least(1), help="class count if not the preset's (91)")
    p.add_argument(
        "--weights", choices=CHECKPOINT_WEIGHTS, default="auto", help="of a checkpoint holding a model and its EMA: the EMA (auto, ema) or the model"
    )
    p.set_defaults(func=cmd_convert)

    for name, (module, help_text) in TOOL_COMMANDS.items():
        p = sub.add_parser(name, parents=[verbosity], help=help_text, description=help_text)
        if command is None or command == name:
            importlib.import_module(module).add_arguments(p)
    return parser


class _StderrHandler(logging.StreamHandler):
    """Writes ``litedetr: message`` (``litedetr: warning: message`` above INFO) to the current ``sys.stderr``,
    through tqdm when it is loaded, so that a progress bar is cleared and redrawn around the line."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):  # the stream at the time of writing, so a replaced sys.stderr is followed
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass

    def format(self, record: logging.LogRecord) -> str:
        level = "" if record.levelno <= logging.INFO else f"{record.levelname.lower()}: "
        return f"litedetr: {level}{record.getMessage()}"

    def emit(self, record: logging.LogRecord) -> None:
        tqdm = sys.modules.get("tqdm")
        if tqdm is None:
            super().emit(record)
            return
        try:
            tqdm.tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must not raise
            self.handleError(record)


def configure_logging(level: int = logging.INFO) -> None:
    """Library modules log through ``logging``; the command line shows ``level`` and above on stderr."""
    logger = logging.getLogger("litedetr")
    logger.handlers[:] = [handler for handler in logger.handlers if not isinstance(handler, _StderrHandler)] + [_StderrHandler()]
    logger.setLevel(level)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    args = build_parser(command if command in TOOL_COMMANDS else "").parse_args(argv)
    configure_logging(getattr(args, "log_level", None) or logging.INFO)
    from litedetr.engine import TrainingDiverged
    from litedetr.models.convert import ConversionError

    try:
        return args.func(args)
    except FileNotFoundError as err:
        print(f"litedetr: error: {err.filename}: no such file", file=sys.stderr)
        return 2
    except (ValueError, ConversionError) as err:
        print(f"litedetr: error: {err}", file=sys.stderr)
        return 2
    except TrainingDiverged as err:
        print(f"litedetr: error: training stopped: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("litedetr: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
