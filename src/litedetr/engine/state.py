"""Resume checkpoints: everything a training run needs to continue exactly, written atomically."""

from __future__ import annotations

import json
import logging
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from litedetr.engine import distributed
from litedetr.weights.files import atomic_write

logger = logging.getLogger(__name__)

__all__ = ["save_state", "load_state", "read_train_config", "rng_state", "set_rng_state", "rank_rng_state"]


def rng_state() -> dict[str, Any]:
    """The random states of Python, NumPy, torch (CPU) and every CUDA device."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss, "gauss": gauss},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_state(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """``torch.save`` to a temporary file beside ``path``, then rename: a crash leaves the old file whole."""
    return atomic_write(path, lambda tmp: torch.save(state, tmp))


def read_train_config(path: str | os.PathLike) -> dict[str, Any]:
    """The training config saved in a checkpoint, without reading its tensors (memory-mapped)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # a truncated or foreign file: name it rather than show a pickle traceback
        raise ValueError(f"{path}: not a readable litedetr training checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(state, dict) or "train_config" not in state:
        raise ValueError(f"{path}: not a litedetr training checkpoint (no train_config entry)")
    return json.loads(state["train_config"])


def load_state(path: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint written by :func:`save_state` (tensors and plain Python values only)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:  # a truncated or foreign file: name it rather than show a pickle traceback
        raise ValueError(f"{path}: not a readable litedetr training checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(state, dict) or "model" not in state or "train_config" not in state:
        raise ValueError(f"{path}: not a litedetr training checkpoint (no model / train_config entries)")
    return state


def rank_rng_state(saved: dict[str, Any] | list[dict[str, Any]], path: Path) -> dict[str, Any]:
    """This rank's random state from a checkpoint (one per rank; checkpoints before 0.2 hold rank 0's only)."""
    states = saved if isinstance(saved, list) else [saved]
    if len(states) != distributed.world_size():
        logger.warning(
            "%s was written by %d process(es), this run has %d: ranks beyond them take rank 0's random state", path, len(states), distributed.world_size()
        )
    rank = distributed.rank()
    return states[rank] if rank < len(states) else states[0]
