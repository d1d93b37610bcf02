"""The ensemble's members in torch, on any device: the engine that also gives Grad-CAM.

Members that bf16 moves too far on validation cells (``check_bf16``, run when the ensemble is built) always
run in fp32.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..data.domain import DomainReference
from ..data.geometry import Preprocess
from ..ensemble.combiners import Combiner
from ..ensemble.folder import EnsembleFolder
from ..ensemble.spec import EnsembleSpec
from ..formats.operating_point import PAPER_POINT, OperatingPoint
from ..models import Member
from ..models.folds import FoldAverage
from ..models.runtime import resolve_device, score_members
from .engine import Engine

logger = logging.getLogger(__name__)


@dataclass
class TorchEngine(Engine):
    members: list[Member | FoldAverage]
    combiner: Combiner
    method: str
    preprocess: Preprocess
    spec: EnsembleSpec | None  # None: members put together in code (benchmarks): no TTA, the paper's 0.5
    device: torch.device
    precision: str = "auto"  # see inference_autocast
    fp32_members: frozenset[str] = frozenset()  # members that bf16 moves too far: always run in fp32
    domain: DomainReference | None = None  # what the training cells look like (None: no domain check)

    @classmethod
    def from_folder(cls, folder: EnsembleFolder | str | Path, *, method: str | None = None, device: str = "auto",
                    precision: str = "auto") -> TorchEngine:
        """Load the ensemble's members; nothing outside the folder is read. Errors name the file and what is wrong
        with it."""
        folder = EnsembleFolder.of(folder)
        spec = folder.spec
        method = method or spec.default_method
        dev = resolve_device(device)
        members = [m.to(dev).to(memory_format=torch.channels_last).eval() for m in folder.load_members()]
        fp32 = frozenset((spec.bf16 or {}).get("fp32_members", []))
        return cls(members, spec.fit(method), method, spec.preprocess, spec, dev, precision, fp32, folder.domain())

    @property
    def batch_size(self) -> int:
        """Cells scored at once: a GPU needs large batches to be busy (BENCHMARKS.md, the GPU check)."""
        return 256 if self.device.type == "cuda" else 32

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.members]

    @property
    def operating_point(self) -> OperatingPoint:
        return PAPER_POINT if self.spec is None else self.spec.operating_point(self.method)

    @property
    def default_tta(self) -> bool:
        """Whether the combiners were fitted on test-time-augmented probabilities (score the same way)."""
        return self.spec is not None and self.spec.tta

    @property
    def cam_weights(self) -> np.ndarray:
        """Member weights for combining Grad-CAM maps (the combiner's; equal when they sum to 0)."""
        w = self.combiner.cam_weights(len(self.members))
        return w if w.sum() > 0 else np.ones(len(self.members))

    def member_probs(self, crops: np.ndarray, *, tta: bool = False) -> np.ndarray:
        """(members, N) P(ALL) for uint8 crops (N, S, S, 3)."""
        return score_members(self.members, crops, device=self.device, precision=self.precision,
                             fp32_members=self.fp32_members, tta=tta, batch_size=self.batch_size)
