"""A training run's records: ``log.jsonl`` (one JSON object per line), TensorBoard scalars, and their reader.

Each record has a ``kind``: ``train`` (one per optimiser step), ``eval`` (one per evaluation) or
``schedule`` (one per cut of the schedule by ``max_train_minutes``), and the ``epoch`` and ``step``
it was written at.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from litedetr.engine import distributed

__all__ = ["LOG_FILE", "RunLog", "read_log"]

logger = logging.getLogger(__name__)

LOG_FILE = "log.jsonl"


def read_log(run_dir: str | Path, kind: str | None = None) -> list[dict[str, Any]]:
    """The records of the run in ``run_dir`` (of ``kind`` only, when given); none when it has no log yet."""
    log = Path(run_dir) / LOG_FILE
    if not log.exists():
        return []
    records = [json.loads(line) for line in log.read_text().splitlines()]
    return records if kind is None else [record for record in records if record["kind"] == kind]


class RunLog:
    """The records of a run in ``out``, in memory (``records``) and, on the main process, in ``log.jsonl``
    and, while open and when TensorBoard is installed, as scalars (``KIND/KEY`` at the record's step)."""

    def __init__(self, out: Path):
        self.out = out
        self.records: list[dict[str, Any]] = []
        self._tensorboard = None

    def write(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        if not distributed.is_main():
            return
        with open(self.out / LOG_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tensorboard is not None:
            for key, value in record.items():
                if isinstance(value, float):
                    self._tensorboard.add_scalar(f"{record['kind']}/{key}", value, record["step"])

    def restore(self, records: list[dict[str, Any]]) -> None:
        """Continue from ``records`` (a checkpoint's): the file keeps those only, so steps after the checkpoint,
        trained again, are not logged twice."""
        self.records = list(records)
        if distributed.is_main():
            (self.out / LOG_FILE).write_text("".join(json.dumps(record) + "\n" for record in self.records))

    def open(self) -> None:
        """Start the TensorBoard scalars (main process, when installed)."""
        if distributed.is_main():
            self._tensorboard = _tensorboard_writer(self.out)

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None


def _tensorboard_writer(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        logger.debug("tensorboard is not installed: no TensorBoard scalars")
        return None
    return SummaryWriter(str(out / "tensorboard"))
