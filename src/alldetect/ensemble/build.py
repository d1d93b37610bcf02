"""Build an ensemble folder from finished member runs: weights, records, fitted combiners, calibration crops,
the bf16 check and the model card."""

from __future__ import annotations

import logging
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from ..data.cache import load_crops
from ..errors import AlldetectError
from ..formats.predictions import Predictions
from ..models import Member
from ..models.runtime import score_members
from ..training.checkpoint import load_checkpoint
from ..training.run_dir import versions
from .card import write_model_card
from .folder import (CALIBRATION_CELLS, calibration_sample, describe_data, load_member, read_calibration,
                     sha256_file, write_calibration, write_ensemble)
from .runs import copy_training_record, read_runs, run_predictions
from .spec import DEFAULT_METHOD, EnsembleSpec, MemberEntry, load_ensemble_spec

logger = logging.getLogger(__name__)
BF16_TOLERANCE = 0.05  # largest mean change of a member's P(ALL), bf16 against fp32, on validation cells


def build_ensemble(run_dirs: list[str | Path], out: str | Path, *, default_method: str = DEFAULT_METHOD,
                   tta: bool | None = None) -> EnsembleSpec:
    """Write a self-contained ensemble folder from finished member runs: each member's selected weights as
    safetensors with its training record, every combiner fitted on validation, predictions, a sample of
    validation crops, and the bf16 check.

    ``tta`` None: on when every member was trained on the eight flips/rotations (the plus profile), so
    the combiners are fitted on the same test-time-augmented probabilities that scoring will use.
    """
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
            members = [load_member(out, entry).eval() for entry in entries]
            splits = {name: _rescored(preds, members, crop, size, cache) for name, preds in splits.items()}
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


def _rescored(preds: list[Predictions], members: list[Member], crop: int, size: int | None,
              cache: str) -> list[Predictions]:
    """The members' predictions recomputed with test-time augmentation (same images, same order)."""
    crops, usable = _crops(preds[0].path, crop, size, cache)
    if not usable.all():
        raise AlldetectError(f"{np.count_nonzero(~usable)} cell image(s) scored in training can no longer be read")
    probs = score_members(members, crops, device=torch.device("cpu"), precision="fp32", tta=True)
    return [replace(p, prob_all=probs[k]) for k, p in enumerate(preds)]


def _crops(paths: list[str], crop: int, size: int | None, cache: str) -> tuple[np.ndarray, np.ndarray]:
    loaded = load_crops(paths, crop=crop, size=size, cache_dir=cache)
    return np.asarray(loaded.images)[loaded.usable], loaded.usable


def check_bf16(ens_dir: str | Path, *, cells: int = 64, tolerance: float = BF16_TOLERANCE) -> dict:
    """Score up to ``cells`` validation cells with every member in fp32 and in bf16. A member whose P(ALL) bf16
    moves by more than ``tolerance`` on average runs in fp32 wherever the ensemble would use bf16 (some networks
    are far more sensitive than others). The verdict goes into ``ensemble.json`` under ``bf16``."""
    spec = load_ensemble_spec(ens_dir)
    members = [load_member(Path(ens_dir), entry).eval() for entry in spec.members]
    crops = read_calibration(ens_dir)[0][:cells]
    cpu = torch.device("cpu")
    fp32 = score_members(members, crops, device=cpu, precision="fp32")
    drift = np.abs(score_members(members, crops, device=cpu, precision="bf16") - fp32).mean(axis=1)
    names = spec.names
    too_far = [name for name, d in zip(names, drift) if d > tolerance]
    for name, d in zip(names, drift):
        if d > tolerance:
            logger.warning("%s: bf16 moves its P(ALL) by %.3f on average over %d validation cells (tolerance "
                           "%.3f); it runs in fp32", name, d, len(crops), tolerance)
    verdict = {"cells": len(crops), "tolerance": tolerance, "mean_change": dict(zip(names, drift.tolist())),
               "fp32_members": too_far}
    spec.bf16 = verdict
    spec.save(ens_dir)
    return verdict
