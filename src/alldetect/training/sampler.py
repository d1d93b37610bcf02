"""Which images each optimizer step sees: a fresh shuffle of the (oversampled) index list every epoch,
derived from (seed, epoch) alone, so a resumed or distributed run sees exactly the same batches."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np


class EpochBatches:
    """Global batches of ``batch_size * world_size`` positions, dealt across ranks; each item is
    ``(dataset_index, augmentation_seed)`` so augmentation does not depend on worker or rank either. ``indices``
    are the dataset indices of every epoch, or a function of the epoch that draws them (of one length)."""

    def __init__(self, indices: np.ndarray | Callable[[int], np.ndarray], *, batch_size: int, seed: int,
                 world_size: int = 1, rank: int = 0):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.indices = indices if callable(indices) else np.asarray(indices)
        self.batch_size, self.seed = batch_size, seed
        self.world_size, self.rank = world_size, rank

    @property
    def steps_per_epoch(self) -> int:
        padded = math.ceil(len(self.indices) / self.world_size) * self.world_size
        return math.ceil(padded / (self.batch_size * self.world_size))

    def epoch(self, epoch: int, *, start_step: int = 0) -> list[list[tuple[int, int]]]:
        """This rank's batches of ``epoch`` from ``start_step`` on."""
        indices = self.indices(epoch) if callable(self.indices) else self.indices
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.indices))
        seeds = np.random.default_rng([self.seed, epoch, 1]).integers(0, 2**31 - 1, size=len(order))
        if len(order) % self.world_size:  # pad as DistributedSampler does, so every rank gets equal batches
            pad = self.world_size - len(order) % self.world_size
            order = np.concatenate([order, order[:pad]])
        global_batch = self.batch_size * self.world_size
        batches = []
        for step in range(start_step, self.steps_per_epoch):
            positions = order[step * global_batch:(step + 1) * global_batch][self.rank::self.world_size]
            batches.append([(int(indices[p]), int(seeds[p])) for p in positions])
        return batches
