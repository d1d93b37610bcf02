"""Cheap measures of one cell image: size, colour, texture, outline, and how much of the frame's border is the
black background that C-NMC's segmentation leaves around a cell."""

from __future__ import annotations

import numpy as np

HAND_FEATURES = ("diameter", "mean_r", "mean_g", "mean_b", "intensity_std", "fine_texture", "outline_irregularity")
SHAPE_AND_STAIN = ("coarse_texture", "hue_spread", "rim_contrast")
MEASURES = ("black_border", *HAND_FEATURES, *SHAPE_AND_STAIN)
FOREGROUND = 10      # a pixel whose mean channel exceeds this is cell, not background
BORDER_SHARE = 0.08  # the outer ring, as a share of the side, that should be background around a segmented cell


def hand_features(image: np.ndarray) -> np.ndarray:
    """Seven features of one cell on black: size, colour, texture and outline (see ``HAND_FEATURES``); the
    diameter is a share of the image's side."""
    return _Cell(image).hand_features()


def cell_measures(crops: np.ndarray) -> np.ndarray:
    """(N, len(MEASURES)) measures of uint8 crops (N, S, S, 3), taken at half their side (means of 2x2 pixels:
    a quarter of the cost, and on real cells they tell the same cells apart): ``black_border`` (the share of
    the outer ring that is black background: 1.0 for a segmented cell in the middle of its frame, near 0 on a
    slide's natural background), ``HAND_FEATURES``, and ``SHAPE_AND_STAIN``: the spread of 4x4-pixel block means
    inside the cell (chromatin's coarse texture), the spread of red minus blue inside it (how evenly stained),
    and how much darker the cell's rim is than its inside."""
    if len(crops) == 0:
        return np.zeros((0, len(MEASURES)))
    return np.stack([_Cell(_halved(c)).measures() for c in crops])


def _halved(image: np.ndarray) -> np.ndarray:
    even = image[:image.shape[0] // 2 * 2, :image.shape[1] // 2 * 2].astype(np.float32)
    return (even[0::2, 0::2] + even[1::2, 0::2] + even[0::2, 1::2] + even[1::2, 1::2]) / 4


class _Cell:
    """One image's grey levels, foreground and its erosion, computed once for every measure."""

    def __init__(self, image: np.ndarray):
        self.rgb = image.astype(np.float32)
        self.gray = self.rgb.mean(axis=2)
        self.mask = self.gray > FOREGROUND
        self.interior = _eroded(self.mask, 1)

    def hand_features(self) -> np.ndarray:
        mask, gray, interior = self.mask, self.gray, self.interior
        if not mask.any():
            return np.zeros(len(HAND_FEATURES))
        area = int(mask.sum())
        laplacian = 4 * gray - sum(np.roll(gray, s, axis=a) for a in (0, 1) for s in (1, -1))
        return np.array([
            np.sqrt(4 * area / np.pi) / gray.shape[0],
            *self.rgb[mask].mean(axis=0, dtype=np.float64),
            gray[mask].std(dtype=np.float64),
            laplacian[interior].std(dtype=np.float64) if interior.any() else 0.0,
            (mask & ~interior).sum() / np.sqrt(area),
        ])

    def measures(self) -> np.ndarray:
        return np.concatenate([[self.black_border()], self.hand_features(), self.shape_and_stain()])

    def black_border(self) -> float:
        ring = max(1, round(BORDER_SHARE * self.gray.shape[0]))
        background = ~self.mask
        inner = background[ring:-ring, ring:-ring]
        return float((background.sum() - inner.sum()) / (background.size - inner.size))

    def shape_and_stain(self) -> np.ndarray:
        mask, gray = self.mask, self.gray
        if mask.sum() < 16:
            return np.zeros(len(SHAPE_AND_STAIN))
        side = gray.shape[0] // 4 * 4
        blocks = gray[:side, :side].reshape(side // 4, 4, side // 4, 4).mean(axis=(1, 3))
        inside = mask[:side, :side].reshape(side // 4, 4, side // 4, 4).all(axis=(1, 3))
        core = _eroded(mask, 2)
        rim = mask & ~core
        return np.array([
            blocks[inside].std(dtype=np.float64) if inside.any() else 0.0,
            (self.rgb[..., 0] - self.rgb[..., 2])[mask].std(dtype=np.float64),
            gray[core].mean(dtype=np.float64) - gray[rim].mean(dtype=np.float64) if core.any() and rim.any()
            else 0.0,
        ])


def _eroded(mask: np.ndarray, step: int) -> np.ndarray:
    """Pixels of ``mask`` whose four neighbours ``step`` pixels away are in it too (wrapping at the edges)."""
    out = mask.copy()
    for axis in (0, 1):
        for shift in (step, -step):
            out &= np.roll(mask, shift, axis=axis)
    return out
