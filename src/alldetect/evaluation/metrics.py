"""Cell-level classification metrics (paper Sec. 2.3), ALL = positive class (label 1).

Plain functions over arrays, computed from the confusion matrix so that thousands of bootstrap resamples
stay cheap; each one equals its scikit-learn counterpart (tested to the last digit).

Definitions, with TN, FP, FN, TP the confusion counts at ``prob_all >= threshold``:
  sensitivity (recall of ALL) = TP / (TP + FN);  specificity (recall of HEM) = TN / (TN + FP)
  ba = (sensitivity + specificity) / 2;  acc = (TP + TN) / N
  wp, wr, wfs: precision, recall and F1 of each class, weighted by the class's support n_c / N
    (the paper's WFS = sum_c n_c F1_c / N); wr equals acc by construction
  kappa = (p_o - p_e) / (1 - p_e), Cohen (1960);  auc: area under the ROC curve (Mann-Whitney, ties = 1/2)
"""

from __future__ import annotations

import warnings

import numpy as np
from numpy.typing import ArrayLike

from ..formats.labels import THRESHOLD, is_all

METRIC_NAMES = ("wp", "wr", "wfs", "acc", "ba", "auc", "kappa", "sensitivity", "specificity", "tn", "fp", "fn", "tp")


PROB_EPS = 1e-7  # probabilities are kept within [PROB_EPS, 1 - PROB_EPS] before a log or a logit


class UndefinedMetricWarning(UserWarning):
    """A metric has no value for this input (e.g. AUC with one class only) and is reported as NaN."""


def check_inputs(y_true: ArrayLike, prob_all: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Validate labels (0/1) and ALL probabilities ([0, 1], finite, same length)."""
    y = np.asarray(y_true)
    p = np.asarray(prob_all, dtype=np.float64)
    if y.ndim != 1 or p.ndim != 1:
        raise ValueError(f"expected 1-D labels and scores, got shapes {y.shape} and {p.shape}")
    if len(y) != len(p):
        raise ValueError(f"{len(y)} labels but {len(p)} scores; join on 'path' first")
    if len(y) == 0:
        raise ValueError("no samples to score")
    if not np.isin(y, (0, 1)).all():
        raise ValueError(f"labels must be 0 (HEM) or 1 (ALL); found {sorted(set(np.unique(y).tolist()) - {0, 1})[:5]}")
    if not np.isfinite(p).all():
        raise ValueError(f"{int((~np.isfinite(p)).sum())} score(s) are NaN or infinite")
    if (p < 0).any() or (p > 1).any():
        raise ValueError(f"prob_all must lie in [0, 1]; found values from {p.min():.4g} to {p.max():.4g}")
    return y.astype(np.int64), p


def confusion_counts(y_true: ArrayLike, y_pred: ArrayLike) -> tuple[int, int, int, int]:
    """``(tn, fp, fn, tp)`` with ALL (1) as the positive class, as ``sklearn.metrics.confusion_matrix(...).ravel()``."""
    y, yhat = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    tn, fp, fn, tp = np.bincount(2 * y + yhat, minlength=4)
    return int(tn), int(fp), int(fn), int(tp)


def roc_auc(y_true: ArrayLike, prob_all: ArrayLike) -> float:
    """Area under the ROC curve via the rank-sum (Mann-Whitney U) statistic; NaN with a warning when
    ``y_true`` holds one class only (e.g. all cells of one patient)."""
    y, p = np.asarray(y_true), np.asarray(prob_all, dtype=np.float64)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        warnings.warn("only one class in y_true; AUC is undefined and reported as NaN", UndefinedMetricWarning,
                      stacklevel=2)
        return float("nan")
    ranks = _average_ranks(p)
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _average_ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    boundaries = np.flatnonzero(np.diff(sorted_values)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(values)]])
    ranks = np.empty(len(values))
    ranks[order] = np.repeat((starts + ends + 1) / 2, ends - starts)
    return ranks


def metrics_from_counts(tn: int, fp: int, fn: int, tp: int) -> dict[str, float]:
    """Every threshold metric from the four confusion counts (no AUC)."""
    n = tn + fp + fn + tp
    n_all, n_hem = tp + fn, tn + fp
    pred_all, pred_hem = tp + fp, tn + fn
    sens = _ratio(tp, n_all)
    spec = _ratio(tn, n_hem)
    prec_all, prec_hem = _ratio(tp, pred_all), _ratio(tn, pred_hem)
    f1_all = _ratio(2 * tp, 2 * tp + fp + fn)
    f1_hem = _ratio(2 * tn, 2 * tn + fn + fp)
    acc = (tp + tn) / n
    p_e = (pred_all * n_all + pred_hem * n_hem) / n**2
    kappa = _ratio(acc - p_e, 1 - p_e) if p_e != 1 else 0.0
    return {
        "wp": (n_all * prec_all + n_hem * prec_hem) / n,
        "wr": (n_all * sens + n_hem * spec) / n,
        "wfs": (n_all * f1_all + n_hem * f1_hem) / n,
        "acc": acc,
        "ba": _balanced(sens, spec, n_all, n_hem),
        "kappa": kappa,
        "sensitivity": sens,
        "specificity": spec,
        "tn": tn, "fp": fp, "fn": fn, "tp": tp,
    }


def _ratio(num: float, den: float) -> float:
    """num/den, or 0 when den is 0 (scikit-learn's ``zero_division=0``)."""
    return num / den if den else 0.0


def _balanced(sens: float, spec: float, n_all: int, n_hem: int) -> float:
    present = [r for r, n in ((sens, n_all), (spec, n_hem)) if n]  # as sklearn: average over classes present
    return sum(present) / len(present)


def classification_metrics(y_true: ArrayLike, prob_all: ArrayLike, *, threshold: float = THRESHOLD) -> dict[str, float]:
    """All contract metrics: ``wp, wr, wfs, acc, ba, auc, kappa, sensitivity, specificity, tn, fp, fn, tp``.

    >>> m = classification_metrics([1, 1, 0, 0], [0.9, 0.4, 0.2, 0.6])
    >>> m["acc"], m["auc"], (m["tn"], m["fp"], m["fn"], m["tp"])
    (0.5, 0.75, (1, 1, 1, 1))
    """
    if not 0 <= threshold <= 1:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    y, p = check_inputs(y_true, prob_all)
    result = metrics_from_counts(*confusion_counts(y, is_all(p, threshold)))
    result["auc"] = roc_auc(y, p)
    return {k: result[k] for k in METRIC_NAMES}


def threshold_for_sensitivity(y_true: ArrayLike, prob_all: ArrayLike, sensitivity: float) -> float:
    """The highest threshold whose sensitivity (ALL recall) reaches ``sensitivity``: the operating point
    for a chosen false-negative rate."""
    y, p = check_inputs(y_true, prob_all)
    positives = np.sort(p[y == 1])[::-1]
    if len(positives) == 0:
        raise ValueError("no ALL cells: sensitivity is undefined")
    if not 0 < sensitivity <= 1:
        raise ValueError(f"sensitivity must be in (0, 1], got {sensitivity}")
    needed = int(np.ceil(sensitivity * len(positives) - 1e-12))
    return float(positives[needed - 1])


def log_loss(y_true: ArrayLike, prob_all: ArrayLike) -> float:
    """Mean binary cross-entropy of ALL probabilities (clipped to [PROB_EPS, 1 - PROB_EPS]).

    >>> round(log_loss([1, 0], [0.9, 0.2]), 6)
    0.164252
    """
    y, p = np.asarray(y_true), np.clip(np.asarray(prob_all, dtype=np.float64), PROB_EPS, 1 - PROB_EPS)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p)))


def logit(p):
    """log(p / (1 - p)) with p clipped to [PROB_EPS, 1 - PROB_EPS]; for numpy arrays, and for torch tensors
    inside the exported graph (the same rule on both sides of the export).

    >>> logit(np.array([0.5, 1.0])).round(3).tolist()
    [0.0, 16.118]
    """
    p = p.clip(PROB_EPS, 1 - PROB_EPS)
    if isinstance(p, np.ndarray):
        return np.log(p) - np.log1p(-p)
    return p.log() - (-p).log1p()
