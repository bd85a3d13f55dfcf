"""``TrainConfig.max_train_minutes``: how long a run's batches take, and how many fit the minutes left.

The trainer times every batch (its loading included) and, after each epoch, cuts the epochs left to
:func:`batches_that_fit`; the learning-rate schedule's length follows from :func:`schedule_length`.
"""

from __future__ import annotations

import math
import time

__all__ = ["BatchClock", "batches_that_fit", "schedule_length"]


class BatchClock:
    """The seconds of each batch of one epoch, from the clock's start or the previous lap."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._last = time.perf_counter()

    def lap(self) -> float:
        """Close the batch just trained; returns its seconds."""
        now = time.perf_counter()
        seconds, self._last = now - self._last, now
        self.seconds.append(seconds)
        return seconds


def batches_that_fit(cap_minutes: float, trained_seconds: float, batch_seconds: float, epochs_left: int, accumulate: int) -> int:
    """Batches per epoch that let ``epochs_left`` epochs fit the minutes left of ``cap_minutes`` at ``batch_seconds``
    each: a multiple of ``accumulate``, and at least one accumulation even when nothing is left."""
    left = max(0.0, cap_minutes * 60 - trained_seconds)
    return max(accumulate, int(left / batch_seconds / epochs_left) // accumulate * accumulate)


def schedule_length(step: int, epoch: int, batches_done: int, epochs: int, epoch_batches: int, accumulate: int) -> int:
    """Optimiser steps of a whole run at optimiser step ``step``, batch ``batches_done`` of epoch ``epoch``:
    those done, the rest of this epoch's and those of the later epochs of ``epoch_batches`` batches."""
    if epoch >= epochs:
        return step
    this_epoch = math.ceil((epoch_batches - batches_done) / accumulate)
    return step + this_epoch + (epochs - epoch - 1) * math.ceil(epoch_batches / accumulate)
