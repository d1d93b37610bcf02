"""Scoring cells as `predict` and the web app both do: decode each image, cut the crop, measure it for the domain
check, score the model inputs in batches, and check the measures against the ensemble's domain reference."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from ..data.cell_measures import MEASURES, cell_measures
from ..data.geometry import FrameGeometry
from ..errors import ImageProblem
from .engine import Engine

# how to get one cell's RGB pixels and what was done to decode them; or, for a cell already known to be
# unusable, why
Decoder = Callable[[], tuple[np.ndarray, str | None]]


@dataclass
class ScoredCells:
    """Per cell, in the order given: the ensemble's and each member's P(ALL) (NaN where the cell could not be
    scored), why not (``errors``), what was done to decode it (``warnings``), and the domain check's verdict
    (``in_domain`` None when there was no check; ``domain_notes`` say what failed)."""
    prob: np.ndarray
    members: np.ndarray
    errors: list[str]
    warnings: list[str]
    in_domain: np.ndarray | None
    domain_notes: list[str]
    crops: np.ndarray      # the model inputs of the scored cells, in order (for Grad-CAM)
    kept: list[int]        # the indices of the scored cells


@dataclass
class ReadCells:
    """The usable cells' model inputs and indices, their measures when asked for, and per cell why it is unusable
    (``errors``) or what was done to decode it (``warnings``)."""
    crops: np.ndarray
    kept: list[int]
    measures: np.ndarray | None
    errors: list[str]
    warnings: list[str]


def read_cells(engine: Engine, cells: Sequence[Decoder | str], names: Sequence[str], *,
               geometry: FrameGeometry = FrameGeometry(), measure: bool = False, workers: int = 1) -> ReadCells:
    """Decode ``cells`` (decoders, or the reason a cell is unusable) named ``names`` on ``workers`` threads, in
    order; keep only each one's model input (and, with ``measure``, the measures of its crop for the domain
    check)."""
    errors, warnings = [""] * len(cells), [""] * len(cells)
    crops, kept, measures = [], [], []
    side = engine.preprocess.side

    def read(i: int) -> tuple[np.ndarray, np.ndarray | None, str] | str:
        cell = cells[i]
        if isinstance(cell, str):
            return cell
        try:
            rgb, note = cell()
            crop = engine.preprocess.cut(rgb, name=names[i], geometry=geometry)
        except ImageProblem as e:
            return e.reason
        return engine.preprocess.resize(crop), cell_measures(crop[None])[0] if measure else None, note or ""

    # decoders release the GIL while they decode
    with ThreadPoolExecutor(max_workers=workers) if workers > 1 else contextlib.nullcontext() as pool:
        results = (pool.map if pool else map)(read, range(len(cells)))
        for i, result in enumerate(tqdm(results, total=len(cells), desc="reading cells", unit="img", leave=False,
                                        disable=None)):
            if isinstance(result, str):
                errors[i] = result
                continue
            crop, measured, warnings[i] = result
            crops.append(crop)
            if measure:
                measures.append(measured)
            kept.append(i)
    return ReadCells(np.stack(crops) if crops else np.zeros((0, side, side, 3), np.uint8), kept,
                     (np.stack(measures) if measures else np.zeros((0, len(MEASURES)))) if measure else None,
                     errors, warnings)


def score_cells(engine: Engine, cells: Sequence[Decoder | str], names: Sequence[str], *, tta: bool | None = None,
                batch_size: int | None = None, domain_check: bool = True,
                geometry: FrameGeometry = FrameGeometry(), workers: int = 1) -> ScoredCells:
    """Score ``cells`` (see ``read_cells``, which decodes on ``workers`` threads); ``tta`` None: as the combiners
    were fitted; ``batch_size`` None: the engine's. The domain check runs when asked for and the engine has a
    reference."""
    tta = engine.uses_tta(tta)
    check = domain_check and engine.domain is not None
    read = read_cells(engine, cells, names, geometry=geometry, measure=check, workers=workers)
    n, kept = len(cells), read.kept
    ens, members = _batched(engine, read.crops, tta, batch_size or engine.batch_size)
    prob, member_probs = np.full(n, np.nan), np.full((len(engine.names), n), np.nan)
    prob[kept], member_probs[:, kept] = ens, members
    notes, in_domain = [""] * n, None
    if check:
        verdict = engine.domain.check(read.measures)
        in_domain = np.ones(n, bool)
        in_domain[kept] = verdict.in_domain
        for i, note in zip(kept, verdict.notes):
            notes[i] = note
    return ScoredCells(prob, member_probs, read.errors, read.warnings, in_domain, notes, read.crops, kept)


def _batched(engine: Engine, crops: np.ndarray, tta: bool, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    if len(crops) == 0:
        return np.zeros(0), np.zeros((len(engine.names), 0))
    ens_parts, member_parts = [], []
    for start in tqdm(range(0, len(crops), batch_size), desc="scoring" + (" (TTA)" if tta else ""), unit="batch",
                      leave=False, disable=None):
        ens, members = engine.predict(crops[start:start + batch_size], tta=tta)
        ens_parts.append(ens)
        member_parts.append(members)
    return np.concatenate(ens_parts), np.concatenate(member_parts, axis=1)
