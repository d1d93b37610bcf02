"""From a manifest split to cached uint8 crops ready for a dataset."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data.cache import load_crops
from ..data.geometry import Preprocess
from ..errors import DataError
from ..formats.manifest import ManifestRow
from ..formats.problems import Problem

logger = logging.getLogger(__name__)


@dataclass
class SplitImages:
    rows: list[ManifestRow]   # the usable rows, in manifest order
    images: np.ndarray        # (M, S, S, 3) uint8 memmap holding (at least) these rows
    positions: np.ndarray     # row i's pixels are images[positions[i]]
    problems: list[Problem]

    @property
    def labels(self) -> np.ndarray:
        return np.array([r.y for r in self.rows], dtype=np.int64)


def load_split(rows: list[ManifestRow], split: str, preprocess: Preprocess, *, cache_dir: str | Path,
               required: bool = True) -> SplitImages | None:
    """Crops for the labelled rows of ``split``; unusable images are reported and left out."""
    chosen = [r for r in rows if r.split == split and r.label]
    if not chosen:
        if required:
            raise DataError(f"the manifest has no labelled '{split}' rows; run `alldetect split` first")
        return None
    cache = load_crops([r.path for r in chosen], preprocess, cache_dir=cache_dir)
    usable = np.flatnonzero(cache.usable)
    if len(usable) == 0:
        raise DataError(f"none of the {len(chosen)} '{split}' images could be used")
    if len(usable) < len(chosen):
        logger.warning("%s: %d of %d images skipped (unreadable or smaller than the crop)", split,
                       len(chosen) - len(usable), len(chosen))
    return SplitImages([chosen[i] for i in usable], cache.images, usable, list(cache.problems.values()))
