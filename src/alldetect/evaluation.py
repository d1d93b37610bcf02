"""Beyond point metrics: subject-level results, bootstrap confidence intervals over subjects (cells of one
subject are not independent), and a paired bootstrap to tell whether one model really beats another."""

from __future__ import annotations

import warnings

import numpy as np

from .metrics import UndefinedMetricWarning, classification_metrics

CI_METRICS = ("wp", "wr", "wfs", "acc", "ba", "auc", "kappa", "sensitivity", "specificity")


def subject_level(y: np.ndarray, prob: np.ndarray, subjects: list[str], *, threshold: float = 0.5) -> list[dict]:
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
                 threshold: float = 0.5, level: float = 0.95) -> dict[str, tuple[float, float]]:
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
