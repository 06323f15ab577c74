"""Which windows each rank reads, in which order, from which position: resumable and DDP-aware."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch.utils.data import Sampler


class ShardedSampler(Sampler[int]):
    """Window indices for this rank: a permutation seeded by (seed, epoch) when shuffling, split round-robin
    across ranks, optionally starting `start` indices in (to resume mid-epoch).

    It replaces Lightning's automatic DistributedSampler (`use_distributed_sampler: false`) because that one
    cannot resume mid-epoch: after a kill, `ckpt_path=last` must continue with the very batches the original
    run would have seen next, not restart the epoch. Lightning calls `set_epoch` at each epoch start.
    Training shards are cut to equal length (every rank takes the same number of steps); evaluation shards
    keep every window once (ranks may differ by one batch; metrics are averaged by torchmetrics).
    """

    def __init__(self, n: int, shuffle: bool, seed: int | None, equal_shards: bool):
        self.n, self.shuffle, self.seed, self.equal_shards = n, shuffle, seed or 0, equal_shards
        self.epoch, self.start = 0, 0
        initialized = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if initialized else 0
        self.world = dist.get_world_size() if initialized else 1

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        if self.equal_shards:
            order = order[: self.n // self.world * self.world]
        return order[self.rank:: self.world]

    def __iter__(self):
        start, self.start = self.start, 0  # a resume offset applies to one pass only
        return iter(self._indices()[start:])

    def __len__(self) -> int:
        # The whole epoch's length, also when resuming: Lightning counts the restored batches towards it.
        return self.n // self.world if self.equal_shards else math.ceil((self.n - self.rank) / self.world)
