"""Cells that are not like C-NMC's, made from real ones, to see whether a domain check flags them: the black
background filled with a smear, the cell rescaled, its stain's hue turned or its colour removed; and frames
that hold no C-NMC-like cell at all (synthetic cells, natural photographs, blank and noise frames)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image

from .synth import render_cell


def smear_background(frame: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The black background replaced by a pink smear with red-cell-like discs, as an unsegmented slide."""
    height, width = frame.shape[:2]
    coarse = rng.normal(0, 1, (height // 32 + 2, width // 32 + 2, 3))
    shade = np.asarray(Image.fromarray(((coarse - coarse.min()) / np.ptp(coarse) * 255).astype(np.uint8))
                       .resize((width, height), Image.BILINEAR), np.float64) / 255
    smear = np.array([222, 196, 208]) - 30 * shade
    yy, xx = np.mgrid[0:height, 0:width]
    for _ in range(12):
        cy, cx, r = rng.uniform(0, height), rng.uniform(0, width), rng.uniform(25, 40)
        smear[(yy - cy) ** 2 + (xx - cx) ** 2 < r ** 2] = (205, 120, 135)
    background = frame.astype(np.float64).mean(axis=2) <= 10
    out = frame.copy()
    out[background] = smear[background].clip(0, 255).astype(np.uint8)
    return out


def rescaled(frame: np.ndarray, factor: float) -> np.ndarray:
    """The cell ``factor`` times its size in a frame of the same size (padded with black, or center-cut)."""
    height, width = frame.shape[:2]
    scaled = np.asarray(Image.fromarray(frame).resize((round(width * factor), round(height * factor)),
                                                      Image.BILINEAR))
    out = np.zeros_like(frame)
    sh, sw = scaled.shape[:2]
    if factor < 1:
        top, left = (height - sh) // 2, (width - sw) // 2
        out[top:top + sh, left:left + sw] = scaled
    else:
        top, left = (sh - height) // 2, (sw - width) // 2
        out = scaled[top:top + height, left:left + width].copy()
    return out


def hue_rotated(frame: np.ndarray, degrees: float = 120) -> np.ndarray:
    hsv = np.asarray(Image.fromarray(frame).convert("HSV")).copy()
    hsv[..., 0] = (hsv[..., 0].astype(int) + round(degrees / 360 * 256)) % 256
    return np.asarray(Image.fromarray(hsv, "HSV").convert("RGB"))


def grey(frame: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(frame).convert("L").convert("RGB"))


def synthetic_cell(side: int, rng: np.random.Generator) -> np.ndarray:
    stain = {"gain": rng.uniform(0.8, 1.2, 3), "brightness": rng.uniform(0.9, 1.1), "texture": rng.uniform(0.8, 1.2)}
    return render_cell(rng, "all" if rng.random() < 0.5 else "hem", stain, side)


def natural_photo(side: int, rng: np.random.Generator) -> np.ndarray:
    """A window of one of scikit-learn's sample photographs, scaled to ``side``."""
    from sklearn.datasets import load_sample_image

    photo = load_sample_image(rng.choice(["china.jpg", "flower.jpg"]))
    size = int(rng.integers(200, min(photo.shape[:2]) + 1))
    top, left = rng.integers(0, photo.shape[0] - size + 1), rng.integers(0, photo.shape[1] - size + 1)
    return np.asarray(Image.fromarray(photo[top:top + size, left:left + size]).resize((side, side), Image.BILINEAR))


def blank(side: int, rng: np.random.Generator) -> np.ndarray:
    return np.full((side, side, 3), rng.choice([0, 255]), np.uint8)


def noise(side: int, rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, (side, side, 3), dtype=np.uint8)


# name -> frame of a real cell (or None) and a generator -> an out-of-domain frame of the same size
CASES: dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]] = {
    "smear background": smear_background,
    "rescaled 0.5x": lambda frame, rng: rescaled(frame, 0.5),
    "rescaled 2x": lambda frame, rng: rescaled(frame, 2.0),
    "hue rotated 120 degrees": lambda frame, rng: hue_rotated(frame),
    "grey-scale": lambda frame, rng: grey(frame),
    "synthetic cell (alldetect synth)": lambda frame, rng: synthetic_cell(frame.shape[0], rng),
    "natural photograph": lambda frame, rng: natural_photo(frame.shape[0], rng),
    "blank frame": lambda frame, rng: blank(frame.shape[0], rng),
    "noise frame": lambda frame, rng: noise(frame.shape[0], rng),
}
