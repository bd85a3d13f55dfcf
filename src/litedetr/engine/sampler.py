"""A shuffling sampler that shards across ranks and can start part-way through an epoch."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

__all__ = ["ResumableSampler"]


class ResumableSampler(Sampler[int]):
    """Indices of one rank's share of an epoch, in an order fixed by ``(seed, epoch)``.

    Like :class:`~torch.utils.data.DistributedSampler` (the epoch's permutation is padded by
    repetition to a multiple of ``num_replicas`` and dealt out rank by rank), plus ``start``: the
    number of this rank's indices to skip, so a run resumed in the middle of an epoch sees exactly
    the samples it had not seen.
    """

    def __init__(self, size: int, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0):
        if size <= 0:
            raise ValueError("cannot sample from an empty dataset")
        self.size, self.num_replicas, self.rank, self.shuffle, self.seed = size, num_replicas, rank, shuffle, seed
        self.epoch, self.start = 0, 0
        self.per_rank = -(-size // num_replicas)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        else:
            order = list(range(self.size))
        order += order[: self.per_rank * self.num_replicas - self.size]
        return iter(order[self.rank :: self.num_replicas][self.start :])

    def __len__(self) -> int:
        return self.per_rank - self.start
