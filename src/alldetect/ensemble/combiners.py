"""Combining members' probabilities (paper Sec. 2.1.3) and better-founded combiners.

Every weight is fitted on the *validation* split only; test predictions are never looked at here.

- SAP (Eq. 1): P'_j = sum_k P_jk / sum_j sum_k P_jk, the plain average of the members' class probabilities.
- WEN (Eq. 2): P'_j = sum_k W_k P_jk / sum_k W_k, with W_k a member's validation accuracy, AUC, F1 (the
  paper's support-weighted F1, WFS) or Cohen's kappa. A negative kappa (worse than chance) gets weight 0;
  when no member scores above 0 the weights fall back to equal (SAP).
- logloss: weights on the simplex that minimise the validation log-loss of the weighted average.
- ts_sap: each member temperature-scaled on validation (Guo et al. 2017), then averaged.
- stacking: logistic regression on the members' validation logits.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import minimize, minimize_scalar
from sklearn.linear_model import LogisticRegression

from ..evaluation.metrics import classification_metrics, log_loss, logit

logger = logging.getLogger(__name__)
WEN_METRICS = {"acc": "acc", "auc": "auc", "f1": "wfs", "kappa": "kappa"}
PAPER_METHODS = ("sap", *(f"wen_{k}" for k in WEN_METRICS))
EXTRA_METHODS = ("logloss", "ts_sap", "stacking")
METHODS = PAPER_METHODS + EXTRA_METHODS
METHOD_LABELS = {  # as tables and figures name them
    "sap": "SAP", "wen_acc": "WEN-acc", "wen_auc": "WEN-auc", "wen_f1": "WEN-f1", "wen_kappa": "WEN-kappa",
    "logloss": "log-loss weights", "ts_sap": "temperature-scaled SAP", "stacking": "logistic stacking"}


def sap(probs: np.ndarray) -> np.ndarray:
    """Eq. 1 for two classes. ``probs``: (members, images) P(ALL); returns (images,) P'(ALL).

    >>> sap(np.array([[0.9, 0.2], [0.5, 0.4]])).round(3).tolist()
    [0.7, 0.3]
    """
    probs = np.asarray(probs, dtype=np.float64)
    per_class = np.stack([1 - probs, probs])          # (class j, member k, image)
    summed = per_class.sum(axis=1)                    # sum over k
    return summed[1] / summed.sum(axis=0)             # normalised over j


def weighted_average(probs: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Eq. 2: sum_k W_k P_k / sum_k W_k.

    >>> weighted_average(np.array([[1.0, 0.0], [0.0, 0.0]]), np.array([3.0, 1.0])).tolist()
    [0.75, 0.0]
    """
    weights = np.asarray(weights, dtype=np.float64)
    if weights.ndim != 1 or len(weights) != len(probs):
        raise ValueError(f"{len(weights)} weights for {len(probs)} members")
    if (weights < 0).any() or weights.sum() <= 0:
        raise ValueError(f"weights must be non-negative with a positive sum, got {weights.tolist()}")
    return weights @ np.asarray(probs, dtype=np.float64) / weights.sum()


def wen_weights(y_val: np.ndarray, val_probs: np.ndarray, metric: str) -> np.ndarray:
    """W_k = member k's validation ``metric`` (acc, auc, f1 or kappa), negative values clipped to 0."""
    key = WEN_METRICS[metric]
    weights = np.array([classification_metrics(y_val, p)[key] for p in val_probs])
    if (weights < 0).any():
        logger.warning("WEN-%s: member(s) %s score below 0 on validation; their weight is 0",
                       metric, np.flatnonzero(weights < 0).tolist())
    weights = np.clip(np.nan_to_num(weights, nan=0.0), 0, None)
    if weights.sum() <= 0:
        logger.warning("WEN-%s: no member scores above 0 on validation; falling back to equal weights (SAP)",
                       metric)
        return np.ones(len(weights))
    return weights


def logloss_weights(y_val: np.ndarray, val_probs: np.ndarray) -> np.ndarray:
    """Simplex weights minimising the validation log-loss of ``weighted_average``."""
    def loss(a: np.ndarray) -> float:
        w = np.exp(a - a.max())
        return log_loss(y_val, weighted_average(val_probs, w / w.sum()))

    a = minimize(loss, np.zeros(len(val_probs)), method="L-BFGS-B").x
    w = np.exp(a - a.max())
    return w / w.sum()


def fit_temperature(y_val: np.ndarray, prob: np.ndarray) -> float:
    """The temperature T minimising validation log-loss of sigmoid(logit(p) / T)."""
    z = logit(prob)
    result = minimize_scalar(lambda log_t: log_loss(y_val, _sigmoid(z / np.exp(log_t))), bounds=(-4, 4),
                             method="bounded")
    return float(np.exp(result.x))


@dataclass
class EnsembleFit:
    """What a combiner learned on validation, enough to apply it to any new image."""
    method: str
    weights: list[float] = field(default_factory=list)       # SAP/WEN/logloss: one per member
    temperatures: list[float] = field(default_factory=list)  # ts_sap
    coef: list[float] = field(default_factory=list)          # stacking: one per member, plus intercept
    intercept: float = 0.0

    def apply(self, probs: np.ndarray) -> np.ndarray:
        """Combine (members, images) P(ALL) into (images,) P(ALL)."""
        probs = np.asarray(probs, dtype=np.float64)
        if self.method == "ts_sap":
            t = np.asarray(self.temperatures)[:, None]
            return sap(_sigmoid(logit(probs) / t))
        if self.method == "stacking":
            return _sigmoid(np.asarray(self.coef) @ logit(probs) + self.intercept)
        return weighted_average(probs, np.asarray(self.weights))


def fit_combiner(method: str, y_val: np.ndarray, val_probs: np.ndarray) -> EnsembleFit:
    """Fit ``method`` (see ``METHODS``) on validation labels and (members, images) probabilities."""
    k = len(val_probs)
    if method == "sap":
        return EnsembleFit(method, weights=[1.0] * k)
    if method.startswith("wen_"):
        return EnsembleFit(method, weights=wen_weights(y_val, val_probs, method[4:]).tolist())
    if method == "logloss":
        return EnsembleFit(method, weights=logloss_weights(y_val, val_probs).tolist())
    if method == "ts_sap":
        return EnsembleFit(method, temperatures=[fit_temperature(y_val, p) for p in val_probs])
    if method == "stacking":
        model = LogisticRegression(C=1.0, max_iter=1000).fit(logit(val_probs).T, y_val)
        return EnsembleFit(method, coef=model.coef_[0].tolist(), intercept=float(model.intercept_[0]))
    raise ValueError(f"unknown ensemble method {method!r}; known: {', '.join(METHODS)}")


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-z))
