"""The operating point: the rule that turns P(ALL) into calls, for a cell and for a patient.

The paper calls a cell ALL at P(ALL) >= 0.5 and a patient by the mean P(ALL) of its cells against the same 0.5.
An ensemble trained on every donor by cross-fitting fits both thresholds on out-of-fold predictions instead
(``alldetect.evaluation.operating_point``): members trained on an oversampled 50/50 mix call most cells of new
healthy donors ALL at 0.5. The point is stored in ``ensemble.json``, one per combiner, and predict, serve,
evaluate, the report and the model card all call through it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from ..choices import FITTED_CRITERIA, Criterion
from .labels import THRESHOLD, is_all

CRITERIA = (Criterion.paper.value, *FITTED_CRITERIA)  # a stored point's: "auto" is resolved when it is fitted


@dataclass(frozen=True)
class OperatingPoint:
    cell_threshold: float = THRESHOLD     # a cell with P(ALL) at or above it is called ALL
    patient_threshold: float = THRESHOLD  # a patient whose cells' mean P(ALL) is at or above it is called ALL
    min_cells: int = 1                    # cells a patient call needs to be about as right as with all cells
    criterion: str = "paper"              # paper (0.5), balanced_accuracy, sensitivity or specificity
    target: float | None = None           # the sensitivity or specificity aimed at
    fitted_on: str = ""                   # what the thresholds were fitted on, in words

    def __post_init__(self) -> None:
        for name in ("cell_threshold", "patient_threshold"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1):
                raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
        if not isinstance(self.min_cells, int) or isinstance(self.min_cells, bool) or self.min_cells < 1:
            raise ValueError(f"min_cells must be a whole number of at least 1, got {self.min_cells!r}")
        if self.criterion not in CRITERIA:
            raise ValueError(f"criterion {self.criterion!r} is not one of {', '.join(CRITERIA)}")
        if self.target is not None and not (isinstance(self.target, (int, float)) and 0 < self.target <= 1
                                            and math.isfinite(self.target)):
            raise ValueError(f"target must be in (0, 1], got {self.target!r}")

    def cells_all(self, prob_all: np.ndarray | float) -> np.ndarray | bool:
        """The cell call: P(ALL) at or above the cell threshold."""
        return is_all(prob_all, self.cell_threshold)

    def patient_all(self, mean_prob_all: float) -> bool:
        """The patient call: the mean P(ALL) of the patient's cells at or above the patient threshold."""
        return bool(is_all(mean_prob_all, self.patient_threshold))

    def describe(self) -> str:
        """One line, as predict, the report and the card print it.

        >>> OperatingPoint().describe()
        'a cell is ALL at P(ALL) >= 0.5; a patient is ALL when the mean P(ALL) of its cells is >= 0.5 (the paper)'
        """
        how = {"paper": "the paper", "balanced_accuracy": "maximising balanced accuracy",
               "sensitivity": f"sensitivity >= {self.target}", "specificity": f"specificity >= {self.target}"}
        source = f"{how[self.criterion]}" + (f" on {self.fitted_on}" if self.fitted_on else "")
        cells = f"; a patient call needs {self.min_cells} cells or more" if self.min_cells > 1 else ""
        return (f"a cell is ALL at P(ALL) >= {self.cell_threshold:.3g}; a patient is ALL when the mean P(ALL) of its "
                f"cells is >= {self.patient_threshold:.3g} ({source}){cells}")

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: object) -> OperatingPoint:
        """A validated point; ``ValueError`` names the field that is wrong."""
        if not isinstance(raw, dict):
            raise ValueError("not an object")
        unknown = set(raw) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown field(s) {', '.join(sorted(unknown))}")
        return cls(**raw)


PAPER_POINT = OperatingPoint()
