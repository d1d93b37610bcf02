"""Fitting every combiner, and each one's operating point, on the validation (or out-of-fold) predictions, and
writing the predictions of every split with every method."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..evaluation.metrics import classification_metrics
from ..evaluation.operating_point import fit_operating_point
from ..formats.labels import Label
from ..formats.predictions import Predictions, write_prediction_blocks
from .combiners import COMBINERS, Combiner, combiner_class, fit_combiner
from .folder import EnsembleFolder
from .spec import EnsembleSpec, MemberEntry


def write_ensemble(folder: EnsembleFolder, members: list[MemberEntry], splits: dict[str, list[Predictions]], *,
                   default_method: str, tta: bool, data: dict, versions: dict, operating_point: str = "paper",
                   target: float | None = None, cross_fitted: bool = False) -> EnsembleSpec:
    """Fit every combiner, and each combiner's operating point (``paper``: 0.5; else the criterion of
    ``fit_operating_point``), on the validation split; write the predictions of every split and the spec."""
    combiner_class(default_method)  # refused before anything is fitted
    val = splits["val"]
    y_val, val_probs = val[0].y, np.stack([p.prob_all for p in val])
    fits = {method: fit_combiner(method, y_val, val_probs) for method in COMBINERS}
    for split, preds in splits.items():
        _write_split(folder.predictions(split), preds, fits)
    points = {}
    if operating_point != "paper":
        donors = val[0].subject or val[0].path
        source = (f"{'out-of-fold' if cross_fitted else 'validation'} predictions of {len(set(donors))} donors "
                  f"({len(y_val)} cells)")
        points = {method: fit_operating_point(y_val, fit.apply(val_probs), donors, criterion=operating_point,
                                              target=target, fitted_on=source) for method, fit in fits.items()}
    spec = EnsembleSpec(members, fits, default_method, data,
                        {p.model: classification_metrics(y_val, p.prob_all) for p in val}, tta, None, versions,
                        points, cross_fitted)
    folder.save_spec(spec)
    return spec


def _write_split(path: Path, preds: list[Predictions], fits: dict[str, Combiner]) -> None:
    ref = preds[0]
    probs = np.stack([p.prob_all for p in preds])
    labels = [Label(y).text for y in ref.y]
    blocks = {p.model: p.prob_all for p in preds} | {method: fit.apply(probs) for method, fit in fits.items()}
    write_prediction_blocks(path, ref.path, labels, blocks, subjects=ref.subject,
                            extra={f"prob_{p.model}": p.prob_all for p in preds})
