"""What scoring gives back: every cell's row of the predictions CSV (``call`` included), and the patient calls."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DataError
from ..evaluation.evaluate import subject_level
from ..formats.csvfiles import write_csv_atomic
from ..formats.operating_point import OperatingPoint

logger = logging.getLogger(__name__)
NUMERIC_PREFIX = "prob_"  # the probability columns: numbers, empty where a cell was not scored


@dataclass
class Table:
    """Rows of named columns, as a CSV file holds them; ``to_pandas()`` gives a DataFrame with numbers as numbers."""
    columns: list[str]
    records: list[dict]

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[dict]:
        return iter(self.records)

    def __getitem__(self, column: str) -> np.ndarray | list:
        """A column: floats (NaN where empty) for the probabilities, the values as they are for the others."""
        if column not in self.columns:
            raise KeyError(f"no column {column!r}; the columns are {', '.join(self.columns)}")
        values = [r[column] for r in self.records]
        if column.startswith(NUMERIC_PREFIX):
            return np.array([float(v) if v != "" else np.nan for v in values])
        return values

    def to_pandas(self):
        """A pandas DataFrame of the rows (pandas must be installed)."""
        try:
            import pandas as pd
        except ImportError:
            raise DataError("to_pandas() needs pandas: pip install pandas") from None
        frame = pd.DataFrame(self.records, columns=self.columns)
        for column in self.columns:
            if column.startswith(NUMERIC_PREFIX) or column in ("cells", "flagged_all", "mean_prob_all",
                                                               "out_of_domain"):
                frame[column] = pd.to_numeric(frame[column].replace("", np.nan))
        return frame

    def to_csv(self, path: str | Path) -> Path:
        write_csv_atomic(path, self.columns, self.records)
        return Path(path)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} rows: {', '.join(self.columns)})"


@dataclass(repr=False)
class CellTable(Table):
    """Every cell as ``alldetect predict`` writes it: ``path``, ``label``, ``prob_all`` (the ensemble's), the
    method (``model``), ``subject``, each member's ``prob_<member>``, ``call`` (ALL, HEM or OUTSIDE, at the
    ensemble's operating point), ``error``, ``warning`` and the domain check's ``in_domain`` and ``domain_note``.
    ``patients()`` gives the patient calls of predict's patients CSV."""
    prob: np.ndarray = None              # the ensemble's P(ALL), NaN where a cell could not be scored
    y: np.ndarray = None                 # the labels, -1 where none
    subjects: list[str] = None
    kept: list[int] = None               # the scored cells
    in_domain: np.ndarray | None = None  # the domain check's verdict per cell (None: no check)
    operating_point: OperatingPoint = None

    @property
    def scored(self) -> int:
        return len(self.kept)

    def patients(self) -> Table:
        """Per subject: cells, cells called ALL, mean P(ALL), the call, and (when labelled) the truth; the domain
        check's count of cells outside. From the scored cells whose subject is known (C-NMC names carry it); the
        others are left out with a warning."""
        kept = [i for i in self.kept if self.subjects[i]]
        if not kept:
            raise DataError("patient calls need the cells' subjects: name the files as C-NMC does "
                            "(UID_<subject>_<image>_<cell>_<label>.bmp) or pass subjects=")
        if len(kept) < len(self.kept):
            logger.warning("%d of %d scored cells name no subject and are left out of the patient calls",
                           len(self.kept) - len(kept), len(self.kept))
        inside = None if self.in_domain is None else self.in_domain[kept]
        rows = subject_level(self.y[kept], self.prob[kept], [self.subjects[i] for i in kept],
                             point=self.operating_point, in_domain=inside)
        return Table(list(rows[0]), rows)
