"""Command-line argument types shared by the commands and the benchmark scripts, and the detector a checkpoint argument names."""

from __future__ import annotations

import argparse
import functools
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from litedetr.models import Detector

__all__ = ["add_runtime_arguments", "parse_size", "size_type", "int_at_least", "float_in", "load_detector"]


def parse_size(text: str, minimum: int = 0) -> tuple[int, int]:
    """``'850x1040'`` -> ``(850, 1040)`` (an argparse type).

    Raises:
        argparse.ArgumentTypeError: not ``HxW`` integers, or a side below ``minimum`` (with the
            default 0, sizes are left for the command to judge).
    """
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 850x1040 (HxW), got {text!r}") from None
    if minimum and (h < minimum or w < minimum):
        raise argparse.ArgumentTypeError(f"size must be at least {minimum}x{minimum}, got {text!r}")
    return h, w


def size_type(minimum: int) -> Callable[[str], tuple[int, int]]:
    """:func:`parse_size` refusing sides below ``minimum``, for ``add_argument(type=...)``."""
    return functools.partial(parse_size, minimum=minimum)


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer ``>= minimum``, refused by name otherwise."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {value}")
        return value

    return parse


def float_in(low: float, high: float = float("inf"), low_open: bool = False, high_open: bool = False) -> Callable[[str], float]:
    """An argparse type: a number in ``[low, high]`` (either end open on request), refused by name otherwise."""
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open or high == float('inf') else ']'}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        too_low = value <= low if low_open else value < low
        too_high = value >= high if high_open else value > high
        if too_low or too_high or value != value:
            raise argparse.ArgumentTypeError(f"must lie in {interval}, got {text}")
        return value

    return parse


def add_runtime_arguments(p: argparse.ArgumentParser) -> None:
    """``--backend`` and ``--precision``: where and in what precision a model or an exported graph runs
    (``litedetr predict`` and ``litedetr eval``). Imports the models here, not at the top: the CLI imports
    this module and ``litedetr --help`` does not import torch."""
    from litedetr.models.exported import BACKENDS, INFERENCE_PRECISIONS

    p.add_argument("--backend", choices=BACKENDS, default="pytorch", help="pytorch (default), or onnxruntime / openvino for a graph from `litedetr export`")
    p.add_argument("--precision", choices=INFERENCE_PRECISIONS, default="float32",
                   help="bf16: PyTorch under bf16 autocast, OpenVINO in bf16 (pays on CPUs with AVX-512 BF16 or AMX)")  # fmt: skip


def load_detector(checkpoint: str | os.PathLike, preset: str | None = None, device: str = "cpu", weights: str = "auto") -> Detector:
    """The detector a ``checkpoint`` argument names: a litedetr model file, or with ``preset`` (``--preset``)
    an original code base's ``.pth`` (:func:`litedetr.weights.load_model` / :func:`~litedetr.weights.load_checkpoint`).
    Imports the weights here: the CLI imports this module and ``litedetr --help`` does not import torch."""
    from litedetr.weights import load_checkpoint, load_model

    return load_model(checkpoint, device) if preset is None else load_checkpoint(checkpoint, preset, weights=weights, device=device)
