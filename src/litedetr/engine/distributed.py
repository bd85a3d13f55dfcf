"""Multi-process training through ``torchrun``: process group set-up and small collectives.

``torchrun --nproc-per-node N -m litedetr.cli train ...`` sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``;
without them everything runs in one process and the collectives are no-ops.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["init_from_env", "is_distributed", "rank", "world_size", "is_main", "all_gather_objects", "all_reduce_mean", "barrier"]


def init_from_env(device: torch.device) -> None:
    """Join the process group ``torchrun`` describes (NCCL for CUDA, gloo for CPU); no-op when alone."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` when alone)."""
    if not is_distributed():
        return [obj]
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def all_reduce_mean(values: dict[str, float]) -> dict[str, float]:
    """The mean over ranks of each value."""
    if not is_distributed() or not values:
        return values
    keys = sorted(values)
    tensor = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    dist.all_reduce(tensor)
    return {k: float(v) / world_size() for k, v in zip(keys, tensor.tolist())}


def barrier() -> None:
    if is_distributed():
        dist.barrier()
