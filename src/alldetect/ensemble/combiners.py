"""Combining members' probabilities (paper Sec. 2.1.3) and better-founded combiners.

Every weight is fitted on the *validation* split only; test predictions are never looked at here.

- SAP (Eq. 1): P'_j = sum_k P_jk / sum_j sum_k P_jk, the plain average of the members' class probabilities.
- WEN (Eq. 2): P'_j = sum_k W_k P_jk / sum_k W_k, with W_k a member's validation accuracy, AUC, F1 (the
  paper's support-weighted F1, WFS) or Cohen's kappa. A negative kappa (worse than chance) gets weight 0;
  when no member scores above 0 the weights fall back to equal (SAP).
- logloss: weights on the simplex that minimise the validation log-loss of the weighted average.
- ts_sap: each member temperature-scaled on validation (Guo et al. 2017), then averaged.
- stacking: logistic regression on the members' validation logits.

A combiner is one class (see ``Combiner``): ``fit`` on validation (or out-of-fold) probabilities, ``apply`` in
numpy (the engines), ``forward`` in torch (inside the exported ONNX graph), its fitted numbers as JSON, and the
member weights its Grad-CAM map uses. ``COMBINERS`` maps each method name to its class.
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import ClassVar

import numpy as np
import torch
from scipy.optimize import minimize, minimize_scalar
from sklearn.linear_model import LogisticRegression

from ..errors import AlldetectError
from ..evaluation.metrics import classification_metrics, log_loss, logit

logger = logging.getLogger(__name__)
COMBINERS: dict[str, type[Combiner]] = {}
_LEGACY_DEFAULTS = {"weights": [], "temperatures": [], "coef": [], "intercept": 0.0}  # fields every method once wrote


def combiner_label(method: str) -> str:
    """The method as tables and figures name it."""
    return COMBINERS[method].label if method in COMBINERS else method


@dataclass(frozen=True)
class Combiner(ABC):
    """What a combiner learned on validation, enough to combine (members, images) P(ALL) of any new image.

    A subclass is a frozen dataclass of what it fits; given a ``name`` (and the ``label`` tables use) it is
    registered: every ensemble fits it, the spec reads it, the graph exports it::

        class Loudest(Combiner, name="loudest", label="loudest member"): ...
    """
    name: ClassVar[str]
    label: ClassVar[str]

    def __init_subclass__(cls, name: str | None = None, label: str | None = None, **kwargs):
        super().__init_subclass__(**kwargs)
        dataclass(frozen=True)(cls)
        if name is not None:
            if name in COMBINERS:
                raise ValueError(f"a combiner named {name!r} is already registered")
            cls.name, cls.label = name, label or name
            COMBINERS[name] = cls

    @classmethod
    @abstractmethod
    def fit(cls, y_val: np.ndarray, val_probs: np.ndarray) -> Combiner:
        """Fit on validation labels and (members, images) probabilities."""

    @abstractmethod
    def apply(self, probs: np.ndarray) -> np.ndarray:
        """(members, images) P(ALL) -> (images,) P(ALL), in float64."""

    @abstractmethod
    def forward(self, probs: torch.Tensor) -> torch.Tensor:
        """``apply`` in torch on (images, members) P(ALL): what the exported graph runs."""

    def cam_weights(self, members: int) -> np.ndarray:
        """Weights for combining the members' Grad-CAM maps (default: equal)."""
        return np.ones(members)

    def to_json(self) -> dict:
        return {"method": self.name, **asdict(self)}

    @classmethod
    def from_json(cls, raw: dict, members: int) -> Combiner:
        """The fitted combiner in ``raw``, checked: ValueError naming the field when it is not usable."""
        own = {f.name for f in fields(cls)}
        if set(raw) - own - {"method"} - set(_LEGACY_DEFAULTS) or \
                any(raw[k] != v for k, v in _LEGACY_DEFAULTS.items() if k in raw and k not in own):
            raise ValueError("not a fitted combiner")
        return cls._checked(raw, members)

    @classmethod
    @abstractmethod
    def _checked(cls, raw: dict, members: int) -> Combiner:
        """Build from the JSON fields, refusing values that would not combine."""


class FieldError(ValueError):
    """A fitted field that cannot be used; the message starts with the field's name."""


def finite_numbers(raw: dict, key: str, count: int, rule: Callable[[list[float]], bool] = bool,
                   what: str = "") -> list[float]:
    """``raw[key]`` as ``count`` finite floats with a finite sum that keep ``rule`` (``what`` says it), else
    FieldError naming ``key``."""
    values = raw.get(key, [])
    if not isinstance(values, list) or len(values) != count or not all(_finite(v) for v in values) \
            or not math.isfinite(sum(abs(v) for v in values)):  # 1e308 twice is finite, its sum is not
        raise FieldError(f"{key} must be {count} finite number(s) with a finite sum, got {values!r}")
    values = [float(v) for v in values]
    if not rule(values):
        raise FieldError(f"{key} must be {what}, got {values}")
    return values


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


class WeightedAverage(Combiner, ABC):
    """Eq. 2 with fitted weights (SAP: equal ones)."""
    weights: list[float]

    def apply(self, probs: np.ndarray) -> np.ndarray:
        return weighted_average(probs, np.asarray(self.weights))

    def forward(self, probs: torch.Tensor) -> torch.Tensor:
        w = probs.new_tensor(self.weights)
        return probs @ w / w.sum()

    def cam_weights(self, members: int) -> np.ndarray:
        return np.asarray(self.weights, dtype=np.float64)

    @classmethod
    def _checked(cls, raw: dict, members: int) -> Combiner:
        # the sum divides: its reciprocal must be finite too (weights of 5e-324 sum to a number 1/x overflows)
        return cls(finite_numbers(raw, "weights", members,
                                  lambda w: min(w) >= 0 and sum(w) > 0 and math.isfinite(1 / sum(w)),
                                  "non-negative with a sum whose reciprocal is finite"))


class SAP(WeightedAverage, name="sap", label="SAP"):
    @classmethod
    def fit(cls, y_val: np.ndarray, val_probs: np.ndarray) -> SAP:
        return cls([1.0] * len(val_probs))


WEN_METRICS = {"acc": "acc", "auc": "auc", "f1": "wfs", "kappa": "kappa"}  # WEN-<name>: classification_metrics key


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


def _wen(metric: str) -> type[WeightedAverage]:
    class WEN(WeightedAverage, name=f"wen_{metric}", label=f"WEN-{metric}"):
        @classmethod
        def fit(cls, y_val: np.ndarray, val_probs: np.ndarray) -> WEN:
            return cls(wen_weights(y_val, val_probs, metric).tolist())

    WEN.__name__ = WEN.__qualname__ = f"WEN_{metric}"
    return WEN


for _metric in WEN_METRICS:
    _wen(_metric)


class LogLossWeights(WeightedAverage, name="logloss", label="log-loss weights"):
    """Simplex weights minimising the validation log-loss of ``weighted_average``."""

    @classmethod
    def fit(cls, y_val: np.ndarray, val_probs: np.ndarray) -> LogLossWeights:
        def loss(a: np.ndarray) -> float:
            w = np.exp(a - a.max())
            return log_loss(y_val, weighted_average(val_probs, w / w.sum()))

        a = minimize(loss, np.zeros(len(val_probs)), method="L-BFGS-B").x
        w = np.exp(a - a.max())
        return cls((w / w.sum()).tolist())


def fit_temperature(y_val: np.ndarray, prob: np.ndarray) -> float:
    """The temperature T minimising validation log-loss of sigmoid(logit(p) / T)."""
    z = logit(prob)
    result = minimize_scalar(lambda log_t: log_loss(y_val, _sigmoid(z / np.exp(log_t))), bounds=(-4, 4),
                             method="bounded")
    return float(np.exp(result.x))


class TemperatureScaledSAP(Combiner, name="ts_sap", label="temperature-scaled SAP"):
    temperatures: list[float]

    @classmethod
    def fit(cls, y_val: np.ndarray, val_probs: np.ndarray) -> TemperatureScaledSAP:
        return cls([fit_temperature(y_val, p) for p in val_probs])

    def apply(self, probs: np.ndarray) -> np.ndarray:
        t = np.asarray(self.temperatures)[:, None]
        return sap(_sigmoid(logit(np.asarray(probs, dtype=np.float64)) / t))

    def forward(self, probs: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logit(probs) / probs.new_tensor(self.temperatures)).mean(dim=1)

    @classmethod
    def _checked(cls, raw: dict, members: int) -> TemperatureScaledSAP:
        return cls(finite_numbers(raw, "temperatures", members, lambda t: min(t) > 0, "positive"))


class Stacking(Combiner, name="stacking", label="logistic stacking"):
    """Logistic regression on the members' logits; Grad-CAM weighs the members by their positive coefficients."""
    coef: list[float]
    intercept: float

    @classmethod
    def fit(cls, y_val: np.ndarray, val_probs: np.ndarray) -> Stacking:
        model = LogisticRegression(C=1.0, max_iter=1000).fit(logit(val_probs).T, y_val)
        return cls(model.coef_[0].tolist(), float(model.intercept_[0]))

    def apply(self, probs: np.ndarray) -> np.ndarray:
        return _sigmoid(np.asarray(self.coef) @ logit(np.asarray(probs, dtype=np.float64)) + self.intercept)

    def forward(self, probs: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logit(probs) @ probs.new_tensor(self.coef) + self.intercept)

    def cam_weights(self, members: int) -> np.ndarray:
        return np.clip(np.asarray(self.coef, dtype=np.float64), 0, None)

    @classmethod
    def _checked(cls, raw: dict, members: int) -> Stacking:
        intercept = raw.get("intercept", 0.0)
        if not _finite(intercept):
            raise FieldError(f"intercept must be a finite number, got {intercept!r}")
        return cls(finite_numbers(raw, "coef", members), float(intercept))


class UnknownMethod(AlldetectError, ValueError):
    """A combiner name that is not registered."""


def combiner_class(method: str) -> type[Combiner]:
    """The registered combiner called ``method``; ``UnknownMethod`` names the known ones."""
    try:
        return COMBINERS[method]
    except KeyError:
        raise UnknownMethod(f"unknown ensemble method {method!r}; known: {', '.join(COMBINERS)}") from None


def fit_combiner(method: str, y_val: np.ndarray, val_probs: np.ndarray) -> Combiner:
    """Fit ``method`` (a name in ``COMBINERS``) on validation labels and (members, images) probabilities."""
    return combiner_class(method).fit(y_val, val_probs)


def combiner_from_json(method: str, raw: object, members: int) -> Combiner:
    """The fitted ``method`` of a spec; ValueError saying what is wrong."""
    combiner = combiner_class(method)
    if not isinstance(raw, dict):
        raise ValueError("not a fitted combiner")
    return combiner.from_json(raw, members)


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-z))
