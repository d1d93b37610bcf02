"""Labels as every contract spells them, and the one rule that turns a probability into a call.

On disk a label is ``all``, ``hem`` or empty (unlabelled); ``1``/``0`` are read too. In arrays it is a
``Label``: 1 (ALL, the positive class), 0 (HEM, normal) or -1 (unlabelled).
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np

LABEL_NAMES = ("all", "hem", "")  # as manifests and predictions files write them
THRESHOLD = 0.5  # a cell (or a subject's mean) with P(ALL) at or above it is called ALL


class Label(IntEnum):
    UNLABELLED = -1
    HEM = 0
    ALL = 1

    @classmethod
    def from_text(cls, text: str) -> Label:
        """``all``/``1`` -> ALL, ``hem``/``0`` -> HEM, empty -> UNLABELLED (case and spaces ignored).

        >>> Label.from_text("ALL"), Label.from_text("0"), Label.from_text("")
        (<Label.ALL: 1>, <Label.HEM: 0>, <Label.UNLABELLED: -1>)
        """
        code = _CODES.get(text.strip().lower())
        if code is None:
            raise ValueError(f"label {text!r} is not all, hem, 1, 0 or empty")
        return cls(code)

    @property
    def text(self) -> str:
        """The label as files write it: ``all``, ``hem`` or empty."""
        return {Label.ALL: "all", Label.HEM: "hem", Label.UNLABELLED: ""}[self]


_CODES = {"all": 1, "1": 1, "hem": 0, "0": 0, "": -1}


def is_all(prob_all: np.ndarray | float, threshold: float = THRESHOLD) -> np.ndarray | bool:
    """The call: P(ALL) at or above the threshold."""
    return np.asarray(prob_all) >= threshold


CALLS = ("ALL", "HEM", "OUTSIDE")  # a cell's call, as the predictions CSV, the web page and the API write it
OUTSIDE = "OUTSIDE"  # the call of a cell the domain check flags: outside what the model was trained on


def call(prob_all: float, threshold: float = THRESHOLD) -> str:
    """``ALL`` or ``HEM``, as pages and figures print it."""
    return "ALL" if prob_all >= threshold else "HEM"


def cell_call(prob_all: float, threshold: float, in_domain: bool | None = None) -> str:
    """A scored cell's call: ``OUTSIDE`` where the domain check flagged it, else ``ALL`` or ``HEM`` at the
    threshold; empty for a cell without a probability.

    >>> cell_call(0.6, 0.7), cell_call(0.8, 0.7), cell_call(0.8, 0.7, in_domain=False), cell_call(float("nan"), 0.5)
    ('HEM', 'ALL', 'OUTSIDE', '')
    """
    if prob_all != prob_all:  # NaN: not scored
        return ""
    return OUTSIDE if in_domain is False else call(prob_all, threshold)
