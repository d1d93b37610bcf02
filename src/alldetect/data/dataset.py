"""Datasets over cached crops, and the paper's random oversampling of the minority class."""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch
from torch.utils.data import Dataset

logger = logging.getLogger(__name__)


class CellDataset(Dataset):
    """``(uint8 CHW tensor, label)`` pairs from an ``(N, S, S, 3)`` uint8 array (usually the memmap cache).

    ``positions`` maps dataset items to rows of ``images`` (default: one to one). An item may be an index
    or ``(index, seed)``: with a seed the random augmentation is drawn from that seed alone, so it does
    not depend on which worker, rank or resumed run produces the sample.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Callable | None = None,
                 positions: np.ndarray | None = None):
        self.positions = np.arange(len(images)) if positions is None else np.asarray(positions)
        if len(self.positions) != len(labels):
            raise ValueError(f"{len(self.positions)} images but {len(labels)} labels")
        self.images, self.labels, self.transform = images, np.asarray(labels, dtype=np.int64), transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        i, seed = item if isinstance(item, tuple) else (item, None)
        x = torch.from_numpy(np.array(self.images[self.positions[i]])).permute(2, 0, 1)  # copy: memmap is read-only
        if self.transform is not None:
            if seed is None:
                x = self.transform(x)
            else:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(seed)
                    x = self.transform(x)
        return x, int(self.labels[i])


def oversample_indices(labels: np.ndarray, *, seed: int) -> np.ndarray:
    """Random oversampling (paper Sec. 2.1.2): every index once, plus minority-class indices drawn with
    replacement until each class has the majority's count (paper: HEM 2,703 -> 5,822; 11,644 in all).

    >>> oversample_indices(np.array([1, 1, 1, 0]), seed=0).tolist()
    [0, 1, 2, 3, 3, 3]
    """
    labels = np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    target = counts.max()
    rng = np.random.default_rng(seed)
    extra = [rng.choice(np.flatnonzero(labels == c), target - n, replace=True)
             for c, n in zip(classes, counts) if n < target]
    indices = np.concatenate([np.arange(len(labels)), *extra]).astype(np.int64)
    logger.info("oversampling: %s -> %d per class, %d in all",
                dict(zip(classes.tolist(), counts.tolist())), target, len(indices))
    return indices


class DonorBalanced:
    """One epoch's image indices with every donor weighing the same within its class and the classes the same,
    whatever each donor's cell count: a class gets the majority class's cell count (as with ``oversample_indices``,
    so an epoch is as long), shared evenly by its donors (the remainder to donors drawn at random), and each donor
    fills its share from its own cells, without repeats while it has enough. With ``batches`` (each cell's imaging
    batch), a class's share is first split evenly over its batches, then over each batch's donors. Drawn afresh
    for every epoch, a function of (seed, epoch) alone."""

    def __init__(self, labels: np.ndarray, subjects: list[str], *, seed: int, batches: list[str] | None = None):
        labels, subjects = np.asarray(labels), np.asarray(subjects)
        batches_of = np.asarray(batches if batches is not None else [""] * len(labels))
        self.seed = seed
        self.per_class = int(np.unique(labels, return_counts=True)[1].max())
        self.groups = {c: [[np.flatnonzero((labels == c) & (batches_of == b) & (subjects == s))
                            for s in np.unique(subjects[(labels == c) & (batches_of == b)])]
                           for b in np.unique(batches_of[labels == c])] for c in np.unique(labels)}
        logger.info("%s-balanced sampling: %s, %d draws per class an epoch",
                    "donor" if batches is None else "batch- and donor", {
                        int(c): f"{sum(map(len, g))} donors" + ("" if batches is None else f" in {len(g)} batches")
                        for c, g in self.groups.items()},
                    self.per_class)

    def __len__(self) -> int:
        return self.per_class * len(self.groups)

    def __call__(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch, 3])
        drawn = []
        for batches in self.groups.values():
            for donors, batch_share in zip(batches, _shares(self.per_class, len(batches), rng)):
                for own, share in zip(donors, _shares(batch_share, len(donors), rng)):
                    whole, rest = divmod(share, len(own))
                    drawn += [rng.permutation(own) for _ in range(whole)] + [rng.choice(own, rest, replace=False)]
        return np.concatenate(drawn).astype(np.int64)


def _shares(total: int, parts: int, rng: np.random.Generator) -> list[int]:
    """``total`` split into ``parts`` shares as even as can be, the remainder to parts drawn at random."""
    shares = np.full(parts, total // parts)
    shares[rng.choice(parts, total % parts, replace=False)] += 1
    return [int(s) for s in shares]
