"""Beyond point metrics: subject-level results, bootstrap confidence intervals over subjects (cells of one
subject are not independent), and a paired bootstrap to tell whether one model really beats another."""

from __future__ import annotations

import logging
import warnings

import numpy as np

from ..errors import AlldetectError
from ..formats.labels import THRESHOLD
from ..formats.predictions import Predictions
from .metrics import UndefinedMetricWarning, classification_metrics, threshold_for_sensitivity

logger = logging.getLogger(__name__)
CI_METRICS = ("wp", "wr", "wfs", "acc", "ba", "auc", "kappa", "sensitivity", "specificity")


def evaluate_predictions(p: Predictions, *, threshold: float = THRESHOLD, ci: int = 0, sensitivity: float | None = None,
                         subjects: bool = False, source: str = "") -> tuple[dict, list[dict] | None]:
    """``alldetect evaluate`` for one model's predictions: the metrics at ``threshold``, with ``ci`` subject
    bootstrap resamples for 95% CIs, the operating point for ``sensitivity``, and the subject-level table.
    Metrics a one-class set cannot define are NaN with a warning; impossible requests are ``AlldetectError``."""
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
        table = subject_level(y, prob, names, threshold=threshold)
        result["subjects_right"] = sum(r["correct"] == "yes" for r in table)
        result["subjects"] = len(table)
    return result, table


def subject_level(y: np.ndarray, prob: np.ndarray, subjects: list[str], *, threshold: float = THRESHOLD) -> list[dict]:
    """Per subject: cells, cells flagged ALL, mean P(ALL), and the call. Rule: a subject is called ALL when
    the mean of its cells' P(ALL) is at least ``threshold``."""
    table = []
    subjects_arr = np.asarray(subjects)
    for s in sorted(set(subjects), key=_natural):
        mask = subjects_arr == s
        mean = float(prob[mask].mean())
        labels = set(y[mask].tolist()) - {-1}
        truth = ("all" if labels.pop() == 1 else "hem") if len(labels) == 1 else ""
        call = "all" if mean >= threshold else "hem"
        table.append({"subject": s, "cells": int(mask.sum()), "flagged_all": int((prob[mask] >= threshold).sum()),
                      "mean_prob_all": mean, "call": call, "truth": truth,
                      "correct": "" if not truth else ("yes" if truth == call else "no")})
    return table


def _natural(s: str) -> tuple:
    digits = "".join(c for c in s if c.isdigit())
    return (s[:1].isalpha(), int(digits) if digits else 0, s)


def _resample_indices(groups: np.ndarray, n_boot: int, seed: int) -> list[np.ndarray]:
    """Cluster bootstrap: draw subjects with replacement, keep all their cells."""
    rng = np.random.default_rng(seed)
    unique, inverse = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(inverse == g) for g in range(len(unique))]
    return [np.concatenate([members[g] for g in rng.integers(0, len(unique), len(unique))]) for _ in range(n_boot)]


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
