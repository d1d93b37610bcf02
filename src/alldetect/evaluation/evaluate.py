"""Beyond point metrics: subject-level results, bootstrap confidence intervals over subjects (cells of one
subject are not independent), and a paired bootstrap to tell whether one model really beats another."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable

import numpy as np

from ..errors import AlldetectError
from ..formats.labels import THRESHOLD, Label, is_all
from ..formats.operating_point import PAPER_POINT, OperatingPoint
from ..formats.predictions import Predictions
from .metrics import UndefinedMetricWarning, classification_metrics, threshold_for_sensitivity
from .operating_point import donor_means

logger = logging.getLogger(__name__)
CI_METRICS = ("wp", "wr", "wfs", "acc", "ba", "auc", "kappa", "sensitivity", "specificity")
DONOR_METRICS = ("subjects_right", "all_right", "hem_right", "subject_auc")  # fractions of donors, donor AUC


def evaluate_predictions(p: Predictions, *, point: OperatingPoint = PAPER_POINT, ci: int = 0,
                         sensitivity: float | None = None, subjects: bool = False,
                         source: str = "") -> tuple[dict, list[dict] | None]:
    """``alldetect evaluate`` for one model's predictions: the metrics at the operating point's cell threshold,
    with ``ci`` subject bootstrap resamples for 95% CIs, the threshold for ``sensitivity``, and the subject-level
    table (patients called by the point's rule). Metrics a one-class set cannot define are NaN with a warning;
    impossible requests are ``AlldetectError``."""
    threshold = point.cell_threshold
    labelled = p.y >= 0
    if not labelled.any():
        raise AlldetectError(f"{source}: model {p.model!r} has no labelled rows to score")
    y, prob = p.y[labelled], p.prob_all[labelled]
    names = [s or path for s, path, keep in zip(p.subject, p.path, labelled) if keep]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UndefinedMetricWarning)
        result: dict = classification_metrics(y, prob, threshold=threshold)
        if ci:
            result["ci95"] = bootstrap_ci(y, prob, np.asarray(names), n_boot=ci, threshold=threshold)
    for w in {str(w.message) for w in caught}:
        logger.warning("%s: %s", p.model, w)
    if sensitivity is not None:
        if not (y == 1).any():
            raise AlldetectError(f"{source}: model {p.model!r} has no ALL cells, so no threshold reaches a "
                                 "sensitivity")
        t = threshold_for_sensitivity(y, prob, sensitivity)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UndefinedMetricWarning)
            at = classification_metrics(y, prob, threshold=t)
        result["operating_point"] = {"threshold": t, "sensitivity": at["sensitivity"],
                                     "specificity": at["specificity"]}
    table = None
    if subjects:
        table = subject_level(y, prob, names, point=point)
        result["subjects_right"] = sum(r["correct"] == "yes" for r in table)
        result["subjects"] = len(table)
    return result, table


def subject_level(y: np.ndarray, prob: np.ndarray, subjects: list[str], *,
                  point: OperatingPoint = PAPER_POINT, in_domain: np.ndarray | None = None) -> list[dict]:
    """Per subject: cells, cells flagged ALL (the point's cell threshold), mean P(ALL), and the call: ALL when the
    mean of its cells' P(ALL) is at least the point's patient threshold. When the point asks for more than one
    cell per call, ``enough_cells`` says whether the subject has them. With ``in_domain`` (the domain check's
    verdict per cell), ``out_of_domain`` counts the cells outside it, the figures come from the cells inside,
    and a subject with most of its cells outside gets no call ("")."""
    table = []
    subjects_arr = np.asarray(subjects)
    inside = np.ones(len(prob), bool) if in_domain is None else np.asarray(in_domain, bool)
    for s in sorted(set(subjects), key=_natural):
        mask = subjects_arr == s
        used = mask & inside
        labels = set(y[mask].tolist()) - {-1}
        truth = Label(labels.pop()).text if len(labels) == 1 else ""
        callable_ = used.sum() * 2 > mask.sum()
        mean = float(prob[used].mean()) if used.any() else float("nan")
        call = (Label.ALL if point.patient_all(mean) else Label.HEM).text if callable_ else ""
        row = {"subject": s, "cells": int(mask.sum()), "flagged_all": int(point.cells_all(prob[used]).sum()),
               "mean_prob_all": mean, "call": call, "truth": truth,
               "correct": "" if not truth or not call else ("yes" if truth == call else "no")}
        if in_domain is not None:
            row["out_of_domain"] = int((mask & ~inside).sum())
        if point.min_cells > 1:
            row["enough_cells"] = "yes" if used.sum() >= point.min_cells else "no"
        table.append(row)
    return table


def donor_metrics(y: np.ndarray, prob: np.ndarray, subjects: list[str], *,
                  point: OperatingPoint = PAPER_POINT) -> dict[str, float]:
    """Cell metrics at the point's cell threshold (``CI_METRICS``) and donor metrics (``DONOR_METRICS``): the
    fractions of donors, of ALL patients and of healthy donors called right by the patient rule, and the AUC of
    ranking donors by their mean P(ALL)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        cells = classification_metrics(y, prob, threshold=point.cell_threshold)
        means, truth, _ = donor_means(y, prob, subjects)
        donors = classification_metrics(truth, means, threshold=point.patient_threshold)
    called_all = is_all(means, point.patient_threshold)
    return {**{k: cells[k] for k in CI_METRICS}, "subjects_right": float(np.mean(called_all == truth)),
            "all_right": float(np.mean(called_all[truth == 1])) if (truth == 1).any() else np.nan,
            "hem_right": float(np.mean(~called_all[truth == 0])) if (truth == 0).any() else np.nan,
            "subject_auc": donors["auc"]}


def _natural(s: str) -> tuple:
    digits = "".join(c for c in s if c.isdigit())
    return (s[:1].isalpha(), int(digits) if digits else 0, s)


def subject_bootstrap(y: np.ndarray, groups: np.ndarray | list[str], statistic: Callable[[np.ndarray, list[str]],
                      dict[str, float]], *, n_boot: int = 1000, seed: int = 0) -> dict[str, np.ndarray]:
    """The one cluster bootstrap over subjects: draw subjects with replacement, keep all their cells, and evaluate
    ``statistic(cell indices, subject of each cell)`` on each draw (a subject drawn twice counts as two subjects,
    named apart). Draws holding one class only are skipped: AUC and the balanced metrics are undefined on them.
    Returns every value's draws."""
    rng = np.random.default_rng(seed)
    unique, inverse = np.unique(np.asarray(groups), return_inverse=True)
    members = [np.flatnonzero(inverse == g) for g in range(len(unique))]
    draws: dict[str, list[float]] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        for _ in range(n_boot):
            chosen = rng.integers(0, len(unique), len(unique))
            idx = np.concatenate([members[g] for g in chosen])
            if len(set(y[idx].tolist())) < 2:
                continue
            drawn = [str(i) for i, g in enumerate(chosen) for _ in range(len(members[g]))]
            for k, v in statistic(idx, drawn).items():
                draws.setdefault(k, []).append(v)
    return {k: np.asarray(v) for k, v in draws.items()}


def percentile_ci(draws: dict[str, np.ndarray], keys: tuple[str, ...], level: float = 0.95
                  ) -> dict[str, tuple[float, float]]:
    """Percentile intervals of bootstrap ``draws`` (NaN draws left out; NaN bounds for a value never drawn)."""
    alpha = (1 - level) / 2
    return {k: (float(np.nanquantile(draws[k], alpha)), float(np.nanquantile(draws[k], 1 - alpha)))
            if len(draws.get(k, ())) else (np.nan, np.nan) for k in keys}


def donor_bootstrap_ci(y: np.ndarray, prob: np.ndarray, subjects: list[str], *, point: OperatingPoint = PAPER_POINT,
                       n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict[str, tuple[float, float]]:
    """Percentile CIs of every ``donor_metrics`` value under the bootstrap over donors."""
    draws = subject_bootstrap(y, subjects, lambda idx, drawn: donor_metrics(y[idx], prob[idx], drawn, point=point),
                              n_boot=n_boot, seed=seed)
    return percentile_ci(draws, (*CI_METRICS, *DONOR_METRICS), level)


def bootstrap_ci(y: np.ndarray, prob: np.ndarray, groups: np.ndarray, *, n_boot: int = 1000, seed: int = 0,
                 threshold: float = THRESHOLD, level: float = 0.95) -> dict[str, tuple[float, float]]:
    """Percentile CIs of ``CI_METRICS`` under the subject bootstrap."""
    draws = subject_bootstrap(y, groups, lambda idx, _: classification_metrics(y[idx], prob[idx],
                                                                               threshold=threshold),
                              n_boot=n_boot, seed=seed)
    return percentile_ci(draws, CI_METRICS, level)


def paired_bootstrap(y: np.ndarray, prob_a: np.ndarray, prob_b: np.ndarray, groups: np.ndarray, *,
                     metric: str = "ba", n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """Difference ``metric(a) - metric(b)`` on the same resampled subjects: point estimate, CI, and the
    share of resamples in which a is not better (a one-sided bootstrap p-value)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        point = classification_metrics(y, prob_a)[metric] - classification_metrics(y, prob_b)[metric]
    draws = subject_bootstrap(y, groups, lambda idx, _: {"difference": classification_metrics(y[idx], prob_a[idx])[
        metric] - classification_metrics(y[idx], prob_b[idx])[metric]}, n_boot=n_boot, seed=seed)
    diffs = draws.get("difference", np.zeros(0))
    return {"metric": metric, "difference": float(point), "ci": percentile_ci(draws, ("difference",), level)[
        "difference"], "p_not_better": float((diffs <= 0).mean()), "resamples": int(len(diffs))}
