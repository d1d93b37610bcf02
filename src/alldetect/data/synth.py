"""Synthetic C-NMC-2019: plausible single-cell images written in the challenge's exact folder layout.

The cells prove the machinery, never the medicine. What is modelled, from measurements of real C-NMC
cells and the paper's description of blasts:
  - one cell per image, centred within ~3 px on pure black, dark violet (mean RGB ~65/27/76), fine texture;
  - size: equivalent diameter of HEM cells ~N(179, 25) px, of ALL blasts ~N(214, 22) px (at 450 px);
  - blasts have a larger nucleus-to-cytoplasm ratio, finer chromatin, nucleoli and more irregular,
    sometimes ragged outlines; every cue overlaps between classes, so no single one decides;
  - every subject has its own stain and illumination, shared by all its cells (the confounder that makes
    subject-level splits necessary), drawn from the same distribution for both classes.
"""

from __future__ import annotations

import contextlib
import json
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from ..formats.csvfiles import write_csv_atomic
from ..formats.labels import Label
from .index import PRELIM_HEADER, SYNTHETIC_MARKER

REFERENCE_SIZE = 450  # C-NMC frame size; geometry below is in pixels at this size
NUCLEUS_RGB = np.array([64.0, 25.0, 72.0])
CYTOPLASM_RGB = np.array([80.0, 40.0, 92.0])


@dataclass(frozen=True)
class SynthConfig:
    size: int = 450                 # frame side in pixels (C-NMC: 450)
    all_subjects: int = 15          # ALL patients in the training folds
    hem_subjects: int = 7           # healthy donors in the training folds (15/7: ~2.15 ALL images per HEM)
    test_all_subjects: int = 4      # labelled preliminary test set
    test_hem_subjects: int = 2
    final_subjects: int = 4         # unlabelled final test set, mixed classes
    cells_per_subject: int = 20
    folds: int = 3
    image_format: str = "bmp"       # "bmp" (as distributed) or "png"
    seed: int = 0


@dataclass(frozen=True)
class _Subject:
    name: str        # "12" or "H3"
    label: str       # "all" or "hem"
    part: str        # "train", "prelim" or "final"
    fold: int
    seed: np.random.SeedSequence


def generate(out: str | Path, cfg: SynthConfig = SynthConfig(), *, workers: int = 2) -> dict:
    """Write the synthetic dataset under ``out``; returns counts per part and class."""
    if cfg.image_format not in ("bmp", "png"):
        raise ValueError(f"image_format must be 'bmp' or 'png', not {cfg.image_format!r}")
    if cfg.size < 64:
        raise ValueError(f"size {cfg.size} is too small for a cell image; use at least 64")
    out = Path(out)
    subjects = _plan_subjects(cfg)
    with ProcessPoolExecutor(max_workers=workers) if workers > 1 else contextlib.nullcontext() as pool:
        jobs = (pool.map if pool else map)(_render_subject, subjects, [cfg] * len(subjects))
        rendered = list(tqdm(jobs, total=len(subjects), desc="synthesising subjects", unit="subject", disable=None))

    counts: dict[str, int] = {}
    held_out: dict[str, list[tuple[str, np.ndarray, str]]] = {"prelim": [], "final": []}
    for subject, cells in zip(subjects, rendered):
        for name, pixels in cells:
            counts[f"{subject.part}/{subject.label}"] = counts.get(f"{subject.part}/{subject.label}", 0) + 1
            if subject.part == "train":
                folder = out / "training_data" / f"fold_{subject.fold}" / subject.label
                _save(pixels, folder / f"{name}.{cfg.image_format}")
            else:
                held_out[subject.part].append((f"{name}.bmp", pixels, subject.label))
    _write_test_part(out / "validation_data" / "C-NMC_test_prelim_phase_data", held_out["prelim"], cfg,
                     labels_csv=out / "validation_data" / "C-NMC_test_prelim_phase_data_labels.csv")
    _write_test_part(out / "testing_data" / "C-NMC_test_final_phase_data", held_out["final"], cfg)
    marker = {"generator": "alldetect synth", "note": "synthetic cells: they test the software, not medicine",
              "config": asdict(cfg), "counts": counts}
    (out / SYNTHETIC_MARKER).write_text(json.dumps(marker, indent=2))
    return counts


def _plan_subjects(cfg: SynthConfig) -> list[_Subject]:
    seeds = iter(np.random.SeedSequence(cfg.seed).spawn(10_000))
    rng = np.random.default_rng(cfg.seed)
    subjects: list[_Subject] = []
    numbers = {"all": 0, "hem": 0}

    def add(label: str, part: str, count: int) -> None:
        folds = rng.permutation(np.arange(count) % cfg.folds)
        for i in range(count):
            numbers[label] += 1
            name = f"H{numbers[label]}" if label == "hem" else str(numbers[label])
            subjects.append(_Subject(name, label, part, int(folds[i]), next(seeds)))

    add("all", "train", cfg.all_subjects)
    add("hem", "train", cfg.hem_subjects)
    add("all", "prelim", cfg.test_all_subjects)
    add("hem", "prelim", cfg.test_hem_subjects)
    for k in range(cfg.final_subjects):
        add("all" if k % 3 != 2 else "hem", "final", 1)
    return subjects


def _render_subject(subject: _Subject, cfg: SynthConfig) -> list[tuple[str, np.ndarray]]:
    rng = np.random.default_rng(subject.seed)
    stain = _draw_stain(rng)
    cells = []
    image, cell = 1, 0
    for _ in range(cfg.cells_per_subject):
        cell += 1
        if cell > 1 and rng.random() < 0.6:  # a smear field holds one to a few segmented cells
            image, cell = image + int(rng.integers(1, 4)), 1
        name = f"UID_{subject.name}_{image}_{cell}_{subject.label}"
        cells.append((name, render_cell(rng, subject.label, stain, cfg.size)))
    return cells


def _draw_stain(rng: np.random.Generator) -> dict:
    """Per-subject staining and illumination: the same distribution for both classes."""
    return {
        "gain": rng.normal(1.0, 0.07, size=3).clip(0.8, 1.2),
        "brightness": float(rng.normal(1.0, 0.08)),
        "texture": float(rng.normal(1.0, 0.15)),
    }


def render_cell(rng: np.random.Generator, label: str, stain: dict, size: int = 450) -> np.ndarray:
    """One ``(size, size, 3)`` uint8 cell on black. ``label`` is ``"all"`` or ``"hem"``."""
    blast = label == "all"
    scale = size / REFERENCE_SIZE
    diameter = (rng.normal(214, 22) if blast else rng.normal(179, 25)) * scale
    diameter = float(np.clip(diameter, 110 * scale, 300 * scale))
    radius = diameter / 2
    half = (size - 1) / 2
    centre = half + rng.uniform(-3, 3, size=2) * scale
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    dy, dx = yy - centre[0], xx - centre[1]
    theta, dist = np.arctan2(dy, dx), np.hypot(dy, dx)

    irregular = rng.uniform(0.01, 0.045) if blast else rng.uniform(0.006, 0.04)
    ragged = rng.uniform(0.02, 0.05) if rng.random() < (0.2 if blast else 0.08) else 0.0
    outline = radius * _harmonics(rng, theta, ellipticity=rng.uniform(0, 0.12), irregular=irregular, ragged=ragged)
    body = np.clip((outline - dist) / (2.5 * scale + 0.5), 0, 1)

    nc_ratio = float(np.clip(rng.normal(0.85, 0.07) if blast else rng.normal(0.79, 0.08), 0.55, 0.97))
    shift = (1 - nc_ratio) * radius * rng.uniform(0, 0.9)
    angle = rng.uniform(0, 2 * np.pi)
    ndy, ndx = dy - shift * np.sin(angle), dx - shift * np.cos(angle)
    n_outline = nc_ratio * radius * _harmonics(rng, np.arctan2(ndy, ndx), ellipticity=rng.uniform(0, 0.08),
                                               irregular=irregular / 2, ragged=0.0)
    nucleus = np.clip((n_outline - np.hypot(ndy, ndx)) / (3 * scale + 0.5), 0, 1)

    # chromatin: blasts fine and even, normal lymphocytes coarse and clumped (overlapping)
    grain = rng.normal(26, 7) if blast else rng.normal(20, 6)
    contrast = (rng.normal(8, 2.5) if blast else rng.normal(9.5, 2.5)) * stain["texture"]
    chromatin = _noise(rng, size, max(4, grain)) * contrast + _noise(rng, size, 6) * 4
    rgb = CYTOPLASM_RGB * (1 - nucleus[..., None]) + NUCLEUS_RGB * nucleus[..., None]
    rgb = rgb + chromatin[..., None] * np.array([1.0, 0.6, 0.8])
    for _ in range(rng.poisson(1.2 if blast else 0.6)):  # nucleoli: small pale spots inside the nucleus
        rgb += _spot(rng, ndy, ndx, nc_ratio * radius * 0.6, rng.uniform(5, 11) * scale)[..., None] * \
            np.array([14.0, 9.0, 10.0])
    rgb = rgb * stain["gain"] * stain["brightness"] * rng.normal(1.0, 0.03)
    rgb = rgb + rng.normal(0, 2.0, size=rgb.shape)
    rgb = rgb * body[..., None]
    return np.clip(rgb, 0, 255).round().astype(np.uint8)


def _harmonics(rng: np.random.Generator, theta: np.ndarray, *, ellipticity: float, irregular: float,
               ragged: float) -> np.ndarray:
    shape = 1 + ellipticity * np.cos(2 * (theta - rng.uniform(0, np.pi)))
    for k in range(3, 9):
        shape = shape + irregular * rng.normal() / (k - 2) ** 0.5 * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    if ragged:
        for k in range(10, 24, 2):
            shape = shape + ragged * rng.normal() / 3 * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    return shape


def _noise(rng: np.random.Generator, size: int, cells: float) -> np.ndarray:
    """Smooth zero-mean unit-variance noise with about ``cells`` features across the frame."""
    n = max(2, int(round(cells)))
    grid = Image.fromarray(rng.normal(size=(n, n)).astype(np.float32), mode="F")
    field = np.asarray(grid.resize((size, size), Image.BICUBIC), dtype=np.float32)
    return (field - field.mean()) / (field.std() + 1e-6)


def _spot(rng: np.random.Generator, dy: np.ndarray, dx: np.ndarray, within: float, radius: float) -> np.ndarray:
    r, a = within * np.sqrt(rng.uniform()), rng.uniform(0, 2 * np.pi)
    d = np.hypot(dy - r * np.sin(a), dx - r * np.cos(a))
    return np.exp(-0.5 * (d / radius) ** 2)


def _save(pixels: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def _write_test_part(folder: Path, cells: list[tuple[str, np.ndarray, str]], cfg: SynthConfig,
                     labels_csv: Path | None = None) -> None:
    """Shuffled and renamed ``1..N``, as in the challenge; the original names go to the labels CSV."""
    if not cells:
        return
    order = np.random.default_rng(cfg.seed + 1).permutation(len(cells))
    records = []
    for number, i in enumerate(order, start=1):
        original, pixels, label = cells[i]
        new_name = f"{number}.{cfg.image_format}"
        _save(pixels, folder / new_name)
        records.append((original, new_name, int(Label.from_text(label))))
    if labels_csv is not None:
        write_csv_atomic(labels_csv, PRELIM_HEADER, [dict(zip(PRELIM_HEADER, r)) for r in records])
