"""A trained ensemble in memory, and how an ensemble folder is built from member runs.

``EnsembleModel.predict`` takes uint8 crops (N, S, S, 3) and returns the ensemble's P(ALL) and every
member's; with ``tta`` each member's probability is the mean over the eight flips and 90-degree rotations
of the cell (cells have no orientation), before combining. Members that bf16 moves too far on validation
cells (``check_bf16``, run when the ensemble is built) always run in fp32.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .ensemble import EnsembleFit
from .ensemble_dir import (CALIBRATION_CELLS, DEFAULT_METHOD, EnsembleSpec, MemberEntry, SpecError,
                           calibration_sample, copy_training_record, describe_data, load_ensemble_spec,
                           read_calibration, read_runs, run_predictions, sha256_file, write_calibration,
                           write_ensemble)
from .errors import AlldetectError
from .inference import inference_autocast, resolve_device
from .model_card import write_model_card
from .models import Member, create_member
from .predictions import Predictions
from .training.checkpoint import load_checkpoint

logger = logging.getLogger(__name__)
BF16_TOLERANCE = 0.05  # largest mean change of a member's P(ALL), bf16 against fp32, on validation cells


@dataclass
class EnsembleModel:
    members: list[Member]
    combiner: EnsembleFit
    method: str
    crop: int
    input_size: int | None
    spec: EnsembleSpec
    device: torch.device
    precision: str = "auto"  # see inference_autocast
    fp32_members: frozenset[str] = frozenset()  # members that bf16 moves too far: always run in fp32

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.members]

    @property
    def default_tta(self) -> bool:
        """Whether the combiners were fitted on test-time-augmented probabilities (score the same way)."""
        return self.spec.tta

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
                precision = "fp32" if member.name in self.fp32_members else self.precision
                with inference_autocast(self.device, precision):
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
    """Load an ensemble folder; nothing outside it is read. Errors name the file and what is wrong with it."""
    spec = load_ensemble_spec(ens_dir)
    method = method or spec.default_method
    combiner = spec.fit(method)
    dev = resolve_device(device)
    members = [load_member(Path(ens_dir), entry).to(dev).to(memory_format=torch.channels_last).eval()
               for entry in spec.members]
    fp32 = frozenset((spec.bf16 or {}).get("fp32_members", []))
    return EnsembleModel(members, combiner, method, spec.crop, spec.input_size, spec, dev, precision, fp32)


def load_member(ens_dir: Path, entry: MemberEntry) -> Member:
    """A member from its safetensors file, after checking the file is the one the spec recorded."""
    path = ens_dir / entry.weights
    if not path.is_file():
        raise SpecError(f"{path}: member weights not found")
    if sha256_file(path) != entry.sha256:
        raise SpecError(f"{path}: the weights do not match the hash recorded in ensemble.json (file damaged, "
                        "truncated or replaced); copy the ensemble folder again")
    try:
        state = load_file(path)
    except (SafetensorError, OSError) as e:
        raise SpecError(f"{path}: not readable member weights ({e})") from None
    model = create_member(entry.name)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise SpecError(f"{path}: does not match the installed {entry.name} ({str(e).splitlines()[0]})") from None
    return model


def build_ensemble(run_dirs: list[str | Path], out: str | Path, *, default_method: str = DEFAULT_METHOD,
                   tta: bool | None = None) -> EnsembleSpec:
    """Write a self-contained ensemble folder from finished member runs: each member's selected weights as
    safetensors with its training record, every combiner fitted on validation, predictions, a sample of
    validation crops, and the bf16 check.

    ``tta`` None: on when every member was trained on the eight flips/rotations (the plus profile), so
    the combiners are fitted on the same test-time-augmented probabilities that scoring will use.
    """
    from .training.loop import versions

    out = Path(out)
    runs = read_runs(run_dirs)
    out.mkdir(parents=True, exist_ok=True)
    for stale in sorted(out.glob("*.onnx")):  # graphs of the ensemble this folder held before
        logger.info("%s: removed (made from the previous ensemble in this folder; export again)", stale)
        stale.unlink()
    entries = []
    for run in runs:
        member_dir = out / "members" / run.name
        copy_training_record(run, member_dir)
        state = load_checkpoint(run.path / "checkpoints" / "best.pt")
        weights = member_dir / "weights.safetensors"
        save_file({k: v.contiguous() for k, v in state["model"].items()}, str(weights))
        provenance = {"run": str(run.path), "manifest": run.config["manifest"], "checkpoint": "checkpoints/best.pt",
                      "select_metric": run.config["select_metric"], "config": run.config}
        entries.append(MemberEntry(run.name, f"members/{run.name}/weights.safetensors", sha256_file(weights),
                                   run.config["crop"], run.config["input_size"], state["model"]["mean"].tolist(),
                                   state["model"]["std"].tolist(), state.get("epoch"), provenance))
    if tta is None:
        tta = all(run.config.get("augment") == "dihedral" for run in runs)
    splits = run_predictions(runs)
    crop, size = entries[0].crop, entries[0].input_size
    with tempfile.TemporaryDirectory() as cache:
        if tta:
            model = _members_only(out, entries)
            splits = {name: _rescored(preds, model, crop, size, cache) for name, preds in splits.items()}
        val = splits["val"][0]
        paths = calibration_sample(val.path, val.y, CALIBRATION_CELLS)
        crops, usable = _crops(paths, crop, size, cache)
        label_of = dict(zip(val.path, val.y))
        write_calibration(out, crops, np.array([label_of[p] for p, ok in zip(paths, usable) if ok]))
    write_ensemble(out, entries, splits, default_method=default_method, tta=tta,
                   data=describe_data(runs[0].config["manifest"]), versions=versions())
    check_bf16(out)
    write_model_card(out)
    return load_ensemble_spec(out)


def _members_only(out: Path, entries: list[MemberEntry]) -> EnsembleModel:
    """The members, in fp32 on the CPU, before any combiner is fitted."""
    spec = EnsembleSpec(entries, {}, "", {})
    members = [load_member(out, entry).eval() for entry in entries]
    return EnsembleModel(members, EnsembleFit("sap", [1.0] * len(members)), "sap", entries[0].crop,
                         entries[0].input_size, spec, torch.device("cpu"), "fp32")


def _rescored(preds: list[Predictions], model: EnsembleModel, crop: int, size: int | None,
              cache: str) -> list[Predictions]:
    """The members' predictions recomputed with test-time augmentation (same images, same order)."""
    crops, usable = _crops(preds[0].path, crop, size, cache)
    if not usable.all():
        raise AlldetectError(f"{np.count_nonzero(~usable)} cell image(s) scored in training can no longer be read")
    probs = model.member_probs(crops, tta=True)
    return [replace(p, prob_all=probs[k]) for k, p in enumerate(preds)]


def _crops(paths: list[str], crop: int, size: int | None, cache: str) -> tuple[np.ndarray, np.ndarray]:
    from .data.cache import load_crops

    loaded = load_crops(paths, crop=crop, size=size, cache_dir=cache)
    return np.asarray(loaded.images)[loaded.usable], loaded.usable


def check_bf16(ens_dir: str | Path, *, cells: int = 64, tolerance: float = BF16_TOLERANCE) -> dict:
    """Score up to ``cells`` validation cells with every member in fp32 and in bf16. A member whose P(ALL) bf16
    moves by more than ``tolerance`` on average runs in fp32 wherever the ensemble would use bf16 (some networks
    are far more sensitive than others). The verdict goes into ``ensemble.json`` under ``bf16``."""
    model = load_ensemble(ens_dir, device="cpu", precision="fp32")
    crops = read_calibration(ens_dir)[0][:cells]
    fp32 = model.member_probs(crops)
    model.precision = "bf16"
    drift = np.abs(model.member_probs(crops) - fp32).mean(axis=1)
    too_far = [name for name, d in zip(model.names, drift) if d > tolerance]
    for name, d in zip(model.names, drift):
        if d > tolerance:
            logger.warning("%s: bf16 moves its P(ALL) by %.3f on average over %d validation cells (tolerance "
                           "%.3f); it runs in fp32", name, d, len(crops), tolerance)
    verdict = {"cells": len(crops), "tolerance": tolerance, "mean_change": dict(zip(model.names, drift.tolist())),
               "fp32_members": too_far}
    spec = load_ensemble_spec(ens_dir)
    spec.bf16 = verdict
    spec.save(ens_dir)
    return verdict
