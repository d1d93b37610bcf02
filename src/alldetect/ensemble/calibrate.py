"""Calibrating an ensemble's operating point on a few labelled donors of a site.

A point fitted on a site's few donors alone overshoots (two healthy donors that score high put the cell
threshold above most ALL cells), and one fitted out of fold on the training batches misses a new batch whose
healthy cells score high as a group. So each threshold is shrunk from the site's fit toward the shipped one, in
logit space, by how many donors the site gives against how many the shipped point is worth:

    logit(t) = (1 - w) logit(t_shipped) + w logit(t_site),   w = n / (n + prior_donors)

with n the site's donors. ``prior_donors`` large keeps the shipped point; 0 is the site's own fit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..choices import Criterion
from ..errors import AlldetectError
from ..evaluation.metrics import logit
from ..evaluation.operating_point import cell_threshold, fit_operating_point
from ..formats.operating_point import OperatingPoint

MIN_DONORS_PER_CLASS = 2   # fewest labelled donors of each class calibrate accepts
PRIOR_DONORS = 4.0         # how many site donors the shipped point is worth (the default of --prior-donors)
INTERVAL_DRAWS = 200       # donor bootstraps behind the threshold's interval


@dataclass(frozen=True)
class Calibration:
    """A calibrated point, the site's own fit it was shrunk from, and how it holds on the calibration donors."""
    point: OperatingPoint
    site_point: OperatingPoint
    site_weight: float                        # w above
    donors: dict[str, int]                    # donor -> class (1 ALL, 0 healthy)
    cells: int
    cell_threshold_interval: tuple[float, float]  # 5-95% over donor bootstraps of the calibration
    leave_one_out: dict                       # each donor called at the point fitted on the others

    def to_json(self) -> dict:
        return {"point": self.point.to_json(), "site_point": self.site_point.to_json(),
                "site_weight": self.site_weight, "donors": self.donors, "cells": self.cells,
                "cell_threshold_interval": list(self.cell_threshold_interval), "leave_one_out": self.leave_one_out}


def donor_classes(y: np.ndarray, subjects: Sequence[str]) -> dict[str, int]:
    """Each named donor's class; a donor with cells of both classes, or a cell without a donor, is refused."""
    if not len(subjects) or not all(subjects):
        raise AlldetectError("calibrating needs every cell's donor (C-NMC file names, or subjects=...)")
    classes: dict[str, set[int]] = {}
    for s, label in zip(subjects, y):
        classes.setdefault(s, set()).add(int(label))
    mixed = sorted(s for s, c in classes.items() if len(c) > 1)
    if mixed:
        raise AlldetectError(f"donor(s) {', '.join(mixed)} have cells of both classes; every cell of a donor "
                             "shares the donor's class")
    return {s: c.pop() for s, c in sorted(classes.items())}


def calibrate_point(shipped: OperatingPoint, y: np.ndarray, prob: np.ndarray, subjects: Sequence[str], *,
                    prior_donors: float = PRIOR_DONORS, min_per_class: int = MIN_DONORS_PER_CLASS) -> OperatingPoint:
    """The operating point of the site's labelled cells (``y`` 1 = ALL, ``prob`` P(ALL), ``subjects`` donors)
    shrunk toward ``shipped``; by the shipped point's criterion (balanced accuracy for the paper's 0.5). The
    fewest cells for a call is the larger of the two points'."""
    return _calibrated(shipped, y, prob, subjects, prior_donors, min_per_class)[0]


def calibrate(shipped: OperatingPoint, y: np.ndarray, prob: np.ndarray, subjects: Sequence[str], *,
              prior_donors: float = PRIOR_DONORS, seed: int = 0) -> Calibration:
    """``calibrate_point`` with what a card reports of it: the site's own fit, the interval of the cell threshold
    over donor bootstraps (each class's donors drawn with replacement), and each donor called at the point
    fitted without it."""
    y, prob = np.asarray(y, dtype=int), np.asarray(prob, dtype=float)
    point, site, w, donors = _calibrated(shipped, y, prob, subjects, prior_donors, MIN_DONORS_PER_CLASS)
    names = np.asarray(subjects)
    rng = np.random.default_rng(seed)
    by_class = [[d for d, c in donors.items() if c == k] for k in (1, 0)]
    thresholds = []
    for _ in range(INTERVAL_DRAWS):
        idx = np.concatenate([np.flatnonzero(names == d) for group in by_class for d in rng.choice(group, len(group))])
        thresholds.append(_shrunk(shipped.cell_threshold, _site_cell_threshold(shipped, y[idx], prob[idx]), w))
    interval = tuple(float(v) for v in np.percentile(thresholds, [5, 95]))
    return Calibration(point, site, w, donors, len(y), interval,
                       _leave_one_donor_out(shipped, y, prob, names, donors, prior_donors))


def _calibrated(shipped: OperatingPoint, y: np.ndarray, prob: np.ndarray, subjects: Sequence[str],
                prior_donors: float, min_per_class: int) -> tuple[OperatingPoint, OperatingPoint, float, dict]:
    """The calibrated point, the site's own fit, the site's weight, and each donor's class."""
    if not (isinstance(prior_donors, (int, float)) and prior_donors >= 0 and np.isfinite(prior_donors)):
        raise AlldetectError(f"prior donors must be a number >= 0, got {prior_donors!r}")
    y, prob = np.asarray(y, dtype=int), np.asarray(prob, dtype=float)
    donors = donor_classes(y, subjects)
    counts = [sum(1 for c in donors.values() if c == k) for k in (1, 0)]
    if min(counts) < min_per_class:
        raise AlldetectError(f"{counts[0]} ALL and {counts[1]} healthy donor(s): calibrating needs at least "
                             f"{min_per_class} donors of each class")
    criterion, target = _criterion(shipped)
    site = fit_operating_point(y, prob, list(subjects), criterion=criterion, target=target)
    w = len(donors) / (len(donors) + prior_donors)
    point = OperatingPoint(_shrunk(shipped.cell_threshold, site.cell_threshold, w),
                           _shrunk(shipped.patient_threshold, site.patient_threshold, w),
                           max(shipped.min_cells, site.min_cells), site.criterion, site.target,
                           f"{len(donors)} donors of the site ({len(y)} cells), weighed {w:.2f} against the shipped "
                           "point")
    return point, site, w, donors


def _leave_one_donor_out(shipped: OperatingPoint, y: np.ndarray, prob: np.ndarray, names: np.ndarray,
                         donors: dict[str, int], prior_donors: float) -> dict:
    right, called, truth = {}, [], []
    for donor, label in donors.items():
        held = names == donor
        point = calibrate_point(shipped, y[~held], prob[~held], list(names[~held]), prior_donors=prior_donors,
                                min_per_class=1)
        right[donor] = point.patient_all(float(prob[held].mean())) == bool(label)
        called.append(point.cells_all(prob[held]))
        truth.append(y[held])
    called, truth = np.concatenate(called), np.concatenate(truth)
    return {"donors_right": int(sum(right.values())), "donors": len(right), "right": right,
            "sensitivity": float(called[truth == 1].mean()), "specificity": float((~called[truth == 0]).mean())}


def _criterion(shipped: OperatingPoint) -> tuple[str, float | None]:
    """The shipped point's criterion, or balanced accuracy for the paper's 0.5."""
    if shipped.criterion == Criterion.paper:
        return Criterion.balanced_accuracy.value, None
    return shipped.criterion, shipped.target


def _site_cell_threshold(shipped: OperatingPoint, y: np.ndarray, prob: np.ndarray) -> float:
    """The cell threshold alone of the site's own fit (its patient threshold and fewest cells cost far more)."""
    criterion, target = _criterion(shipped)
    return cell_threshold(y, prob, criterion=criterion, target=target)


def _shrunk(shipped: float, site: float, w: float) -> float:
    z = np.dot([1 - w, w], logit(np.array([shipped, site], dtype=float)))
    return float(1 / (1 + np.exp(-z)))
