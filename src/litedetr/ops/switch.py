"""An off switch for an optional family of kernels, shared by the Triton and C++ CPU kernels."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

__all__ = ["KernelSwitch"]


class KernelSwitch:
    """On unless inside :meth:`off` (re-entrant: nested ``off()`` contexts keep it off until the outermost ends)."""

    def __init__(self) -> None:
        self._off_depth = 0

    @property
    def on(self) -> bool:
        return self._off_depth == 0

    @contextlib.contextmanager
    def off(self) -> Iterator[None]:
        self._off_depth += 1
        try:
            yield
        finally:
            self._off_depth -= 1
