"""A trained ensemble in memory: its members (on any device), its combiner, and its preprocessing.

``EnsembleModel.predict`` takes uint8 crops (N, S, S, 3) and returns the ensemble's P(ALL) and every
member's; with ``tta`` each member's probability is the mean over the eight flips and 90-degree rotations
of the cell (cells have no orientation), before combining.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .ensemble import EnsembleFit
from .ensemble_dir import load_ensemble_spec, method_fit
from .errors import AlldetectError
from .inference import inference_autocast, resolve_device
from .models import Member, create_member
from .training.checkpoint import CheckpointError, load_checkpoint


@dataclass
class EnsembleModel:
    members: list[Member]
    combiner: EnsembleFit
    method: str
    crop: int
    input_size: int | None
    spec: dict
    device: torch.device
    precision: str = "auto"  # see inference_autocast

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.members]

    @property
    def cam_weights(self) -> np.ndarray:
        """Member weights for combining Grad-CAM maps: the method's weights (SAP, WEN, log-loss), the positive
        part of the stacking coefficients, or equal weights (temperature-scaled SAP)."""
        if self.combiner.weights:
            w = np.asarray(self.combiner.weights, dtype=np.float64)
        elif self.combiner.coef:
            w = np.clip(np.asarray(self.combiner.coef, dtype=np.float64), 0, None)
        else:
            w = np.ones(len(self.members))
        return w if w.sum() > 0 else np.ones(len(self.members))

    @torch.inference_mode()
    def member_probs(self, crops: np.ndarray, *, tta: bool = False, batch_size: int = 32) -> np.ndarray:
        """(members, N) P(ALL) for uint8 crops (N, S, S, 3)."""
        out = np.zeros((len(self.members), len(crops)))
        for start in range(0, len(crops), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(crops[start:start + batch_size])).permute(0, 3, 1, 2)
            x = x.to(self.device).contiguous(memory_format=torch.channels_last)
            views = dihedral_views(x) if tta else [x]
            for k, member in enumerate(self.members):
                with inference_autocast(self.device, self.precision):
                    probs = [member(v).float().softmax(1)[:, 1] for v in views]
                out[k, start:start + len(x)] = torch.stack(probs).mean(0).double().cpu().numpy()
        return out

    def predict(self, crops: np.ndarray, *, tta: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """The ensemble's P(ALL) (N,) and the members' (members, N)."""
        members = self.member_probs(crops, tta=tta)
        return self.combiner.apply(members), members


def dihedral_views(x: torch.Tensor) -> list[torch.Tensor]:
    """The eight symmetries of the square: four 90-degree rotations, each with and without a flip."""
    rotations = [torch.rot90(x, k, dims=(2, 3)) for k in range(4)]
    return rotations + [torch.flip(r, dims=(3,)) for r in rotations]


def load_ensemble(ens_dir: str | Path, *, method: str | None = None, device: str = "auto",
                  precision: str = "auto") -> EnsembleModel:
    """Load an ensemble directory; errors say which member or checkpoint does not fit the installed code."""
    spec = load_ensemble_spec(ens_dir)
    method = method or spec["default_method"]
    combiner = method_fit(spec, method)
    dev = resolve_device(device)
    members = []
    for entry in spec["members"]:
        state = load_checkpoint(entry["checkpoint"])
        if state.get("member") != entry["name"]:
            raise CheckpointError(f"{entry['checkpoint']}: holds {state.get('member')!r}, the spec says "
                                  f"{entry['name']!r}")
        model = create_member(entry["name"])
        try:
            model.load_state_dict(state["model"])
        except RuntimeError as e:
            raise CheckpointError(f"{entry['checkpoint']}: does not match the installed {entry['name']} "
                                  f"({str(e).splitlines()[0]})") from None
        members.append(model.to(dev).to(memory_format=torch.channels_last).eval())
    if not members:
        raise AlldetectError(f"{ens_dir}: the ensemble has no members")
    return EnsembleModel(members, combiner, method, spec["members"][0]["crop"], spec["members"][0]["input_size"],
                         spec, dev, precision)
