"""Command-line argument types shared by the commands and the benchmark scripts."""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable

__all__ = ["parse_size", "size_type"]


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
