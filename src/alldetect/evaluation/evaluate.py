"""Beyond point metrics: subject-level results, bootstrap confidence intervals over subjects (cells of one
subject are not independent), and a paired bootstrap to tell whether one model really beats another."""

from __future__ import annotations

import logging
import warnings

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


def _resample_indices(groups: np.ndarray, n_boot: int, seed: int) -> list[np.ndarray]:
    """Cluster bootstrap: draw subjects with replacement, keep all their cells."""
    return [idx for idx, _ in _resample(groups, n_boot, seed)]


def _resample(groups: np.ndarray, n_boot: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Cluster bootstrap draws: the cells' indices, and for each cell the draw its subject came from (a subject
    drawn twice counts as two subjects)."""
    rng = np.random.default_rng(seed)
    unique, inverse = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(inverse == g) for g in range(len(unique))]
    draws = []
    for _ in range(n_boot):
        chosen = rng.integers(0, len(unique), len(unique))
        draws.append((np.concatenate([members[g] for g in chosen]),
                      np.concatenate([np.full(len(members[g]), i) for i, g in enumerate(chosen)])))
    return draws


def donor_bootstrap_ci(y: np.ndarray, prob: np.ndarray, subjects: list[str], *, point: OperatingPoint = PAPER_POINT,
                       n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict[str, tuple[float, float]]:
    """Percentile CIs of every ``donor_metrics`` value under a bootstrap over donors (resamples holding one class
    only are skipped)."""
    draws: dict[str, list[float]] = {m: [] for m in (*CI_METRICS, *DONOR_METRICS)}
    for idx, drawn in _resample(np.asarray(subjects), n_boot, seed):
        if len(set(y[idx].tolist())) < 2:
            continue
        for k, v in donor_metrics(y[idx], prob[idx], [str(d) for d in drawn], point=point).items():
            draws[k].append(v)
    alpha = (1 - level) / 2
    return {k: (float(np.nanquantile(v, alpha)), float(np.nanquantile(v, 1 - alpha))) if v else (np.nan, np.nan)
            for k, v in draws.items()}


def bootstrap_ci(y: np.ndarray, prob: np.ndarray, groups: np.ndarray, *, n_boot: int = 1000, seed: int = 0,
                 threshold: float = THRESHOLD, level: float = 0.95) -> dict[str, tuple[float, float]]:
    """Percentile CIs of ``CI_METRICS`` under a subject-cluster bootstrap. Resamples holding one class only
    are skipped (AUC and balanced metrics are undefined on them)."""
    draws = {m: [] for m in CI_METRICS}
    for idx in _resample_indices(groups, n_boot, seed):
        if len(set(y[idx].tolist())) < 2:
            continue
        m = classification_metrics(y[idx], prob[idx], threshold=threshold)
        for k in CI_METRICS:
            draws[k].append(m[k])
    alpha = (1 - level) / 2
    return {k: (float(np.quantile(v, alpha)), float(np.quantile(v, 1 - alpha))) if v else (np.nan, np.nan)
            for k, v in draws.items()}


def paired_bootstrap(y: np.ndarray, prob_a: np.ndarray, prob_b: np.ndarray, groups: np.ndarray, *,
                     metric: str = "ba", n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """Difference ``metric(a) - metric(b)`` on the same resampled subjects: point estimate, CI, and the
    share of resamples in which a is not better (a one-sided bootstrap p-value)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        point = classification_metrics(y, prob_a)[metric] - classification_metrics(y, prob_b)[metric]
        diffs = []
        for idx in _resample_indices(groups, n_boot, seed):
            if len(set(y[idx].tolist())) < 2:
                continue
            diffs.append(classification_metrics(y[idx], prob_a[idx])[metric]
                         - classification_metrics(y[idx], prob_b[idx])[metric])
    diffs = np.asarray(diffs)
    alpha = (1 - level) / 2
    return {"metric": metric, "difference": float(point), "ci": (float(np.quantile(diffs, alpha)),
                                                                   float(np.quantile(diffs, 1 - alpha))),
            "p_not_better": float((diffs <= 0).mean()), "resamples": int(len(diffs))}
