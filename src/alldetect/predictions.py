"""The predictions contract: ``path,label,prob_all`` plus optional ``model,subject`` (and member columns).

``label`` is ``all``/``hem`` (``1``/``0`` accepted on reading) or empty for unlabelled images;
``prob_all`` is the probability of ALL.
"""

from __future__ import annotations

import csv
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .data.manifest import write_csv_atomic
from .errors import DataError

logger = logging.getLogger(__name__)
REQUIRED = ("path", "label", "prob_all")
_LABELS = {"all": 1, "1": 1, "hem": 0, "0": 0, "": -1}


@dataclass
class Predictions:
    """One model's scores; ``y`` is 1 (ALL), 0 (HEM) or -1 (unlabelled)."""
    path: list[str]
    y: np.ndarray
    prob_all: np.ndarray
    model: str = ""
    subject: list[str] | None = None

    @property
    def labelled(self) -> bool:
        return bool(len(self.y)) and bool((self.y >= 0).all())


def write_predictions(path: str | Path, paths: list[str], labels: list[str], prob_all: np.ndarray, *,
                      model: str = "", subjects: list[str] | None = None,
                      extra: dict[str, np.ndarray] | None = None) -> None:
    """Write one model's predictions; ``extra`` adds columns (e.g. each member's prob_all)."""
    write_prediction_blocks(path, paths, labels, {model: prob_all}, subjects=subjects, extra=extra)


def write_prediction_blocks(path: str | Path, paths: list[str], labels: list[str], blocks: dict[str, np.ndarray],
                            *, subjects: list[str] | None = None, extra: dict[str, np.ndarray] | None = None) -> None:
    """Write several models' predictions on the same images into one file, one block of rows per model."""
    subjects = subjects or [""] * len(paths)
    extra = extra or {}
    records = []
    for model, prob_all in blocks.items():
        for i, p in enumerate(paths):
            record = {"path": p, "label": labels[i], "prob_all": f"{float(prob_all[i]):.8f}", "model": model,
                      "subject": subjects[i]}
            record.update({k: f"{float(v[i]):.8f}" for k, v in extra.items()})
            records.append(record)
    write_csv_atomic(path, ("path", "label", "prob_all", "model", "subject", *extra), records)


def read_predictions(path: str | Path) -> dict[str, Predictions]:
    """Read a predictions CSV, keyed by ``model`` (one key, the file stem, when the column is absent)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: predictions file not found")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in REQUIRED if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{path}: missing column(s) {', '.join(missing)}; predictions need "
                            f"{','.join(REQUIRED)}")
        groups: dict[str, list[tuple[str, int, float, str]]] = {}
        failed = 0
        for line, row in enumerate(reader, start=2):
            if (row.get("error") or "").strip():
                failed += 1  # an image that could not be scored: no probability to read
                continue
            label = (row["label"] or "").strip().lower()
            if label not in _LABELS:
                raise DataError(f"{path}:{line}: label {row['label']!r} is not all, hem, 1, 0 or empty")
            try:
                prob = float(row["prob_all"])
            except (TypeError, ValueError):
                raise DataError(f"{path}:{line}: prob_all {row['prob_all']!r} is not a number") from None
            if math.isnan(prob) or not 0.0 <= prob <= 1.0:
                raise DataError(f"{path}:{line}: prob_all {prob} is not a probability in [0, 1]")
            model = (row.get("model") or "").strip() or path.stem
            groups.setdefault(model, []).append((row["path"], _LABELS[label], prob, (row.get("subject") or "")))
    if failed:
        logger.warning("%s: %d row(s) with an error and no probability were left out", path, failed)
    if not groups:
        raise DataError(f"{path}: no predictions")
    return {m: Predictions([r[0] for r in rs], np.array([r[1] for r in rs]), np.array([r[2] for r in rs]), m,
                           [r[3] for r in rs]) for m, rs in groups.items()}
