"""Fitting the operating point (``formats.operating_point``) on out-of-fold predictions: a cell threshold, a
patient threshold on donor means, and how many cells a patient call needs.

Fit it only on predictions of donors the scoring model never trained on (out-of-fold); a threshold fitted on
the cells a model learnt from, or on one or two validation donors, does not carry to new donors.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_curve

from ..choices import FITTED_CRITERIA
from ..formats.operating_point import OperatingPoint
from .metrics import check_inputs, threshold_for_sensitivity

CELL_COUNTS = (1, 2, 3, 5, 10, 20, 50)  # patient sizes tried when fitting min_cells
MIN_CELLS_AGREEMENT = 0.9  # how often a call from n random cells must agree with the call from all of them
DRAWS = 200


def fit_operating_point(y: np.ndarray, prob: np.ndarray, subjects: list[str], *, criterion: str = "balanced_accuracy",
                        target: float | None = None, fitted_on: str = "", seed: int = 0) -> OperatingPoint:
    """The cell threshold by ``criterion`` (balanced_accuracy, sensitivity >= ``target`` or specificity >=
    ``target``), the patient threshold that best separates the donors' mean P(ALL), and the fewest cells with
    which a patient call is about as right as with all of a donor's cells."""
    y, prob = check_inputs(y, prob)
    cell = cell_threshold(y, prob, criterion=criterion, target=target)
    means, truth, counts = donor_means(y, prob, subjects)
    patient = patient_threshold(means, truth) if len(set(truth.tolist())) == 2 else cell
    min_cells = fit_min_cells(y, prob, subjects, patient, seed=seed)
    return OperatingPoint(float(cell), float(patient), min_cells, criterion,
                          None if criterion == "balanced_accuracy" else target, fitted_on)


def cell_threshold(y: np.ndarray, prob: np.ndarray, *, criterion: str = "balanced_accuracy",
                   target: float | None = None) -> float:
    """The cell threshold by ``criterion``: balanced accuracy, sensitivity >= ``target`` or specificity >=
    ``target``."""
    if criterion == "balanced_accuracy":
        return balanced_accuracy_threshold(y, prob)
    if criterion == "sensitivity":
        return threshold_for_sensitivity(y, prob, target)
    if criterion == "specificity":
        return threshold_for_specificity(y, prob, target)
    raise ValueError(f"unknown criterion {criterion!r}; choose {', '.join(FITTED_CRITERIA)}")


def balanced_accuracy_threshold(y: np.ndarray, prob: np.ndarray) -> float:
    """The threshold maximising balanced accuracy (Youden's J), placed halfway to the next lower score so that
    it does not sit on a cell.

    >>> round(balanced_accuracy_threshold(np.array([0, 0, 1, 1]), np.array([0.1, 0.6, 0.7, 0.9])), 6)
    0.65
    """
    fpr, tpr, thresholds = roc_curve(y, prob, drop_intermediate=False)
    best = int(np.argmax(tpr - fpr))
    if not np.isfinite(thresholds[best]):  # everything called HEM is best: just above the highest score
        return float(min(1.0, np.nextafter(thresholds[1], 2.0)))
    lower = thresholds[best + 1] if best + 1 < len(thresholds) else 0.0
    return float((thresholds[best] + lower) / 2)


def threshold_for_specificity(y: np.ndarray, prob: np.ndarray, specificity: float) -> float:
    """The lowest threshold whose specificity (HEM recall) reaches ``specificity``.

    >>> round(threshold_for_specificity(np.array([0, 0, 0, 0, 1]), np.array([0.1, 0.2, 0.3, 0.4, 0.9]), 0.75), 6)
    0.35
    """
    y, p = check_inputs(y, prob)
    negatives = np.sort(p[y == 0])
    if len(negatives) == 0:
        raise ValueError("no HEM cells: specificity is undefined")
    if not 0 < specificity <= 1:
        raise ValueError(f"specificity must be in (0, 1], got {specificity}")
    needed = int(np.ceil(specificity * len(negatives) - 1e-12))
    above = negatives[needed:]
    if len(above) and above[0] > negatives[needed - 1]:
        return float((negatives[needed - 1] + above[0]) / 2)
    return float(np.nextafter(negatives[needed - 1], 2.0))


def donor_means(y: np.ndarray, prob: np.ndarray, subjects: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per donor: mean P(ALL), class (its cells' label) and number of cells, in sorted donor order."""
    names = np.asarray(subjects)
    donors = sorted(set(subjects))
    masks = [names == d for d in donors]
    return (np.array([prob[m].mean() for m in masks]), np.array([int(y[m].max()) for m in masks]),
            np.array([int(m.sum()) for m in masks]))


def patient_threshold(means: np.ndarray, truth: np.ndarray) -> float:
    """The threshold on donor means with the best balanced accuracy over donors; among equally good ones, the
    one farthest from every donor's mean.

    >>> round(patient_threshold(np.array([0.2, 0.3, 0.6, 0.9]), np.array([0, 0, 1, 1])), 6)
    0.45
    """
    values = np.unique(means)
    candidates = np.concatenate([[values[0] / 2], (values[1:] + values[:-1]) / 2, [(values[-1] + 1) / 2]])
    ba = np.array([_balanced_accuracy(truth, means >= t) for t in candidates])
    margin = np.array([np.abs(means - t).min() for t in candidates])
    best = np.flatnonzero(ba >= ba.max() - 1e-12)
    return float(candidates[best[np.argmax(margin[best])]])


def fit_min_cells(y: np.ndarray, prob: np.ndarray, subjects: list[str], threshold: float, *, seed: int = 0) -> int:
    """The fewest cells (of ``CELL_COUNTS``) whose mean, drawn at random from a donor, gives the call that all
    its cells give at least ``MIN_CELLS_AGREEMENT`` of the time (averaged over the donors of each class, then
    over the two classes)."""
    names = np.asarray(subjects)
    means, truth, counts = donor_means(y, prob, subjects)
    rng = np.random.default_rng(seed)
    donors = sorted(set(subjects))
    tried = 1
    for n in CELL_COUNTS:
        enough = counts >= n
        if len(set(truth[enough].tolist())) < 2:
            break
        tried = n
        agreement = np.array([np.mean([(prob[rng.choice(np.flatnonzero(names == d), n, replace=False)].mean()
                                        >= threshold) == (mean >= threshold) for _ in range(DRAWS)])
                              for d, mean, keep in zip(donors, means, enough) if keep])
        kept_truth = truth[enough]
        if np.mean([agreement[kept_truth == c].mean() for c in (0, 1)]) >= MIN_CELLS_AGREEMENT:
            return n
    return tried


def _balanced_accuracy(truth: np.ndarray, called_all: np.ndarray) -> float:
    recalls = [np.mean(called_all[truth == 1]) if (truth == 1).any() else np.nan,
               np.mean(~called_all[truth == 0]) if (truth == 0).any() else np.nan]
    return float(np.nanmean(recalls))
