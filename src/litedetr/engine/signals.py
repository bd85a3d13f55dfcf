"""Stop signals: SIGTERM and SIGINT ask a training run to finish its step, checkpoint and exit."""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

__all__ = ["STOP_SIGNALS", "install_stop_handlers", "restore_handlers", "leave_stop_signals_to_the_main_process"]

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
"""What ``timeout``, ``docker stop``, Slurm and Ctrl-C send."""


def leave_stop_signals_to_the_main_process(worker_id: int) -> None:
    """Data-loading workers ignore the stop signals: sent to the whole process group, they would kill the
    workers under the main process, which then fails with a traceback instead of finishing its step and
    checkpointing; it stops the workers itself. (A ``worker_init_fn``.)"""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def install_stop_handlers(stop: threading.Event) -> dict[int, Any]:
    """SIGTERM/SIGINT set ``stop``; a second SIGINT interrupts at once. Returns the previous handlers."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def handler(signum: int, frame: Any) -> None:
        if stop.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        logger.warning("received %s: finishing the current step and writing a checkpoint", signal.Signals(signum).name)
        stop.set()

    return {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}


def restore_handlers(previous: dict[int, Any]) -> None:
    """Put back the handlers :func:`install_stop_handlers` replaced."""
    for sig, handler in previous.items():
        signal.signal(sig, handler)
