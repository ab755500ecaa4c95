"""A sampler whose position inside an epoch can be saved and restored (resume mid-epoch, requeue)."""

from __future__ import annotations

import torch
from torch.utils.data import Sampler


class ResumableSampler(Sampler[int]):
    """Shuffles with a seed derived from (seed, epoch), splits indices across processes, and can start at an
    offset, so that a resumed run sees exactly the images the uninterrupted run would have seen."""

    def __init__(self, num_samples: int, shuffle: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1):
        self.num_samples = num_samples
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch's order and skip its first `start` indices of this process (already consumed)."""
        self.epoch = epoch
        self.start = start

    def _indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.num_samples, generator=g).tolist()
        else:
            order = list(range(self.num_samples))
        per_rank = self.num_samples // self.world_size  # equal share per process; the remainder is dropped
        return order[self.rank * per_rank:(self.rank + 1) * per_rank] if self.world_size > 1 else order

    def __iter__(self):
        return iter(self._indices()[self.start:])

    def __len__(self) -> int:
        return len(self._indices()) - self.start
