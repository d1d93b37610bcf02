"""The engine interface: an ensemble ready to score crops, whatever runs it (torch, onnxruntime)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import NamedTuple

import numpy as np

from ..data.domain import DomainReference
from ..data.transforms import input_side
from ..ensemble.combiners import EnsembleFit
from ..formats.operating_point import OperatingPoint


class Scores(NamedTuple):
    ensemble: np.ndarray  # (N,) the ensemble's P(ALL)
    members: np.ndarray   # (members, N) each member's P(ALL)


class Engine(ABC):
    """Scores uint8 crops (N, S, S, 3) of ``input_size`` (or ``crop``) pixels. Besides ``combiner`` and
    ``operating_point`` (the method's cell and patient calls), an engine has ``names`` (its members), ``method``,
    ``crop``, ``input_size``, ``default_tta`` (whether the combiners were fitted on test-time-augmented
    probabilities, so scoring should use TTA too) and ``domain`` (the domain check's reference, or None)."""
    combiner: EnsembleFit
    operating_point: OperatingPoint
    domain: DomainReference | None

    @property
    def side(self) -> int:
        """The side of the crops the engine scores."""
        return input_side(self.crop, self.input_size)

    @abstractmethod
    def member_probs(self, crops: np.ndarray, *, tta: bool = False) -> np.ndarray:
        """(members, N) P(ALL); with ``tta`` each the mean over the eight flips and rotations of the cell."""

    def predict(self, crops: np.ndarray, *, tta: bool = False) -> Scores:
        members = self.member_probs(crops, tta=tta)
        return Scores(self.combiner.apply(members), members)
