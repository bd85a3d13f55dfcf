"""Command-line interface: ``litedetr COMMAND ...``."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from litedetr import __version__

# torch and the models are imported by the command that runs, not here: `litedetr --help` stays fast.


TOOL_COMMANDS: dict[str, tuple[str, str]] = {
    "schedule": ("litedetr.tools.schedule", "which tokens are queries in each encoder layer, for an image size"),
    "models": ("litedetr.tools.models", "list the named model presets"),
    "convert": (
        "litedetr.tools.convert",
        "convert a checkpoint (.pth) of the authors' Lite-DINO, DINO, Deformable DETR or H-DETR into a litedetr model file",
    ),
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
    from litedetr.weights import ConversionError

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
