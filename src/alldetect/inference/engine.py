"""The engine interface: an ensemble ready to score crops, whatever runs it (torch, onnxruntime)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import NamedTuple

import numpy as np

from ..data.domain import DomainReference
from ..data.geometry import Preprocess
from ..ensemble.combiners import Combiner
from ..formats.operating_point import OperatingPoint


class Scores(NamedTuple):
    ensemble: np.ndarray  # (N,) the ensemble's P(ALL)
    members: np.ndarray   # (members, N) each member's P(ALL)


class Engine(ABC):
    """Scores uint8 model inputs (N, S, S, 3), S = ``preprocess.side``. Besides ``combiner`` and
    ``operating_point`` (the method's cell and patient calls), an engine has ``names`` (its members), ``method``,
    ``preprocess`` (how a cell image becomes the input), ``default_tta`` (whether the combiners were fitted on
    test-time-augmented probabilities, so scoring should use TTA too) and ``domain`` (the domain check's
    reference, or None)."""
    combiner: Combiner
    operating_point: OperatingPoint
    domain: DomainReference | None
    preprocess: Preprocess
    batch_size: int = 32  # cells scored at once

    def uses_tta(self, tta: bool | None = None) -> bool:
        """Whether scoring uses test-time augmentation: as asked, or (None) as the combiners were fitted."""
        return self.default_tta if tta is None else tta

    @abstractmethod
    def member_probs(self, crops: np.ndarray, *, tta: bool = False) -> np.ndarray:
        """(members, N) P(ALL); with ``tta`` each the mean over the eight flips and rotations of the cell."""

    def predict(self, crops: np.ndarray, *, tta: bool | None = None) -> Scores:
        """The ensemble's and each member's P(ALL); ``tta`` None: as the combiners were fitted."""
        members = self.member_probs(crops, tta=self.uses_tta(tta))
        return Scores(self.combiner.apply(members), members)
