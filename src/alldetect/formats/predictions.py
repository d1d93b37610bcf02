"""The predictions contract: ``path,label,prob_all`` plus optional ``model,subject`` (and member columns).

``label`` is ``all``/``hem`` (``1``/``0`` accepted on reading) or empty for unlabelled images;
``prob_all`` is the probability of ALL.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DataError
from .csvfiles import formula_safe, printable, read_csv_checked, write_csv_atomic
from .labels import Label

logger = logging.getLogger(__name__)
REQUIRED = ("path", "label", "prob_all")


@dataclass
class Predictions:
    """One model's scores; ``y`` is 1 (ALL), 0 (HEM) or -1 (unlabelled)."""
    path: list[str]
    y: np.ndarray
    prob_all: np.ndarray
    model: str = ""
    subject: list[str] | None = None
    in_domain: np.ndarray | None = None  # the domain check's verdict per cell, when the file has one

    def inside(self) -> Predictions:
        """The cells the domain check left in (all of them when there was no check)."""
        if self.in_domain is None:
            return self
        keep = self.in_domain
        return Predictions([p for p, k in zip(self.path, keep) if k], self.y[keep], self.prob_all[keep], self.model,
                           None if self.subject is None else [s for s, k in zip(self.subject, keep) if k])


def write_predictions(path: str | Path, paths: list[str], labels: list[str], prob_all: np.ndarray, *,
                      model: str = "", subjects: list[str] | None = None,
                      extra: dict[str, np.ndarray] | None = None) -> None:
    """Write one model's predictions; ``extra`` adds columns (e.g. each member's prob_all)."""
    write_prediction_blocks(path, paths, labels, {model: prob_all}, subjects=subjects, extra=extra)


def write_prediction_blocks(path: str | Path, paths: list[str], labels: list[str], blocks: dict[str, np.ndarray],
                            *, subjects: list[str] | None = None, extra: dict[str, np.ndarray] | None = None,
                            errors: list[str] | None = None) -> None:
    """Write several models' predictions on the same images into one file, one block of rows per model."""
    write_csv_atomic(path, *prediction_records(paths, labels, blocks, subjects=subjects, extra=extra, errors=errors))


def prediction_records(paths: list[str], labels: list[str], blocks: dict[str, np.ndarray], *,
                       subjects: list[str] | None = None, extra: dict[str, np.ndarray] | None = None,
                       errors: list[str] | None = None, warnings: list[str] | None = None,
                       texts: dict[str, list[str]] | None = None, spreadsheet_safe: bool = False,
                       printed: bool = False) -> tuple[list[str], list[dict]]:
    """Contract columns and rows; a NaN probability (an image that could not be scored) is left empty and
    ``errors`` adds an ``error`` column saying why, ``warnings`` a ``warning`` column (what was done to a cell
    to score it), ``texts`` more text columns (e.g. the domain check's). ``spreadsheet_safe``, for files made
    from names users supplied, writes names ``printable`` (a file name that is not UTF-8 or holds bidi marks
    can neither break nor disguise a row) and neutralises those a spreadsheet would run as a formula; ``printed``
    says the texts are ``printable`` already (escaping them again would double their backslashes)."""
    clean = (lambda t: formula_safe(t if printed else printable(t))) if spreadsheet_safe else str
    paths, subjects = [clean(p) for p in paths], [clean(s) for s in subjects or [""] * len(paths)]
    notes = {"error": errors, "warning": warnings, **(texts or {})}
    notes = {column: [clean(t) for t in values] for column, values in notes.items() if values is not None}
    extra = extra or {}
    records = []
    for model, prob_all in blocks.items():
        for i, p in enumerate(paths):
            record = {"path": p, "label": labels[i], "prob_all": _number(prob_all[i]), "model": model,
                      "subject": subjects[i], **{k: _number(v[i]) for k, v in extra.items()}}
            record.update({column: texts[i] for column, texts in notes.items()})
            records.append(record)
    columns = ["path", "label", "prob_all", "model", "subject", *extra, *notes]
    return columns, records


def _number(value: float) -> str:
    return "" if math.isnan(value) else f"{float(value):.8f}"


def read_predictions(path: str | Path) -> dict[str, Predictions]:
    """Read a predictions CSV, keyed by ``model`` (one key, the file stem, when the column is absent)."""
    path = Path(path)
    groups: dict[str, list[tuple[str, int, float, str, str]]] = {}
    failed = 0
    for line, row in read_csv_checked(path, REQUIRED, kind="predictions"):
        if (row.get("error") or "").strip():
            failed += 1  # an image that could not be scored: no probability to read
            continue
        try:
            label = Label.from_text(row["label"] or "")
        except ValueError as e:
            raise DataError(f"{path}:{line}: {e}") from None
        try:
            prob = float(row["prob_all"])
        except (TypeError, ValueError):
            raise DataError(f"{path}:{line}: prob_all {row['prob_all']!r} is not a number") from None
        if math.isnan(prob) or not 0.0 <= prob <= 1.0:
            raise DataError(f"{path}:{line}: prob_all {prob} is not a probability in [0, 1]")
        model = (row.get("model") or "").strip() or path.stem
        groups.setdefault(model, []).append((row["path"], int(label), prob, (row.get("subject") or ""),
                                             (row.get("in_domain") or "").strip()))
    if failed:
        logger.warning("%s: %d row(s) with an error and no probability were left out", path, failed)
    if not groups:
        raise DataError(f"{path}: no predictions")
    return {m: Predictions([r[0] for r in rs], np.array([r[1] for r in rs]), np.array([r[2] for r in rs]), m,
                           [r[3] for r in rs], _verdicts(path, [r[4] for r in rs])) for m, rs in groups.items()}


def _verdicts(path: Path, values: list[str]) -> np.ndarray | None:
    """The ``in_domain`` column (``yes``/``no``) as booleans; None when the file has no domain check."""
    if not any(values):
        return None
    unknown = sorted(set(values) - {"yes", "no"})
    if unknown:
        raise DataError(f"{path}: in_domain {unknown[0]!r} is not yes or no")
    return np.array([v == "yes" for v in values])
