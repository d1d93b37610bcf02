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
from ..data.domain import DomainReference, fit_domain, measure_images
from ..data.geometry import Preprocess
from ..choices import Criterion
from ..data.transforms import DIHEDRAL_AUGMENTATIONS
from .. import versions
from ..errors import AlldetectError
from ..formats.manifest import read_manifest
from ..formats.predictions import Predictions
from ..precision import BF16_TOLERANCE
from ..models.runtime import score_members
from .card import write_model_card
from .fitting import write_ensemble
from .folder import CALIBRATION_CELLS, EnsembleFolder, sha256_file
from .runs import MemberRuns, copy_training_record, describe_data, read_runs, run_predictions
from .spec import DEFAULT_METHOD, EnsembleSpec, MemberEntry

logger = logging.getLogger(__name__)
DOMAIN_CELLS = 4000    # most training cells the domain reference is fitted on (drawn evenly when there are more)


def build_ensemble(run_dirs: list[str | Path], out: EnsembleFolder | str | Path, *,
                   default_method: str = DEFAULT_METHOD, tta: bool | None = None, operating_point: str = "auto",
                   target: float | None = None) -> EnsembleSpec:
    """Write a self-contained ensemble folder from finished member runs: each member's selected weights as
    safetensors with its training record, every combiner fitted on validation, predictions, a sample of
    validation crops, and the bf16 check.

    Several runs of one member are the fold models of a cross-fit: the member scores as their average, and the
    combiners are fitted on the out-of-fold predictions of every donor.

    ``tta`` None: on when every member was trained on the eight flips/rotations (the plus profile), so
    the combiners are fitted on the same test-time-augmented probabilities that scoring will use.

    ``operating_point``: how each combiner's cell and patient thresholds are chosen: ``paper`` (0.5),
    ``balanced_accuracy``, ``sensitivity`` or ``specificity`` (at least ``target``), on the validation
    predictions; ``auto`` fits balanced accuracy when they are out of fold for every donor (a cross-fit), and
    keeps the paper's 0.5 otherwise, since thresholds fitted on a few validation donors do not carry to new ones.
    """
    folder = EnsembleFolder.of(out)
    out = folder.path
    members = read_runs(run_dirs)
    cross_fitted = members[0].cross_fitted
    out.mkdir(parents=True, exist_ok=True)
    for stale in sorted(out.glob("*.onnx")):  # graphs of the ensemble this folder held before
        logger.info("%s: removed (made from the previous ensemble in this folder; export again)", stale)
        stale.unlink()
    entries = [_member_entry(member, out) for member in members]
    if tta is None:
        tta = all(run.config.get("augment") in DIHEDRAL_AUGMENTATIONS for m in members for run in m.folds)
    splits = run_predictions(members)
    preprocess = entries[0].preprocess
    with tempfile.TemporaryDirectory() as cache:
        if tta:
            splits = {name: _rescored(preds, members, entries, folder, preprocess, cache, out_of_fold=name == "val")
                      for name, preds in splits.items()}
        val = splits["val"][0]
        paths = calibration_sample(val.path, val.y, CALIBRATION_CELLS)
        crops, usable = _crops(paths, preprocess, cache)
        label_of = dict(zip(val.path, val.y))
        folder.write_calibration(crops, np.array([label_of[p] for p, ok in zip(paths, usable) if ok]))
    if operating_point == Criterion.auto:
        operating_point = (Criterion.balanced_accuracy if cross_fitted else Criterion.paper).value
    write_ensemble(folder, entries, splits, default_method=default_method, tta=tta,
                   data=describe_data(members[0].config["manifest"], folds=len(members[0].folds)),
                   versions=versions(), operating_point=operating_point, target=target, cross_fitted=cross_fitted)
    folder.record_domain(training_domain(members[0].config["manifest"], preprocess.crop))
    check_bf16(folder)
    write_model_card(folder)
    return folder.spec


def calibration_sample(paths: list[str], labels: np.ndarray, n: int, *, seed: int = 0) -> list[str]:
    """Up to ``n`` paths, both classes in their proportions, drawn with a fixed seed.

    >>> calibration_sample(["a", "b", "c", "d"], np.array([1, 1, 0, 0]), 2)
    ['b', 'd']
    """
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    if len(paths) <= n:
        return list(paths)
    chosen: list[int] = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        take = max(1, round(n * len(members) / len(labels)))
        chosen.extend(rng.choice(members, size=min(take, len(members)), replace=False).tolist())
    return [paths[i] for i in sorted(chosen)[:n]]


def _member_entry(member: MemberRuns, out: Path) -> MemberEntry:
    """Copy a member's weights (one file per fold model) and training records into the folder."""
    files, hashes, provenance = [], [], []
    for k, run in enumerate(member.folds):
        record = Path("members") / member.name / (f"fold{k}" if member.cross_fitted else "")
        copy_training_record(run, out / record)
        state = run.folder.best_state()
        weights = out / record / "weights.safetensors"
        save_file({k: v.contiguous() for k, v in state["model"].items()}, str(weights))
        files.append((record / "weights.safetensors").as_posix())
        hashes.append(sha256_file(weights, kind="member weights"))
        provenance.append({"run": str(run.path), "manifest": run.config["manifest"],
                           "checkpoint": run.folder.best.relative_to(run.path).as_posix(),
                           "select_metric": run.config["select_metric"],
                           "epoch": state.get("epoch"), "config": run.config})
    info = provenance[0] if not member.cross_fitted else {"config": member.config, "folds": provenance}
    pre = Preprocess.from_json(member.config)
    return MemberEntry(member.name, files, hashes, pre.crop, pre.input_size, state["model"]["mean"].tolist(),
                       state["model"]["std"].tolist(), pre.colour, state.get("epoch"), info)


def _rescored(preds: list[Predictions], members: list[MemberRuns], entries: list[MemberEntry], folder: EnsembleFolder,
              preprocess: Preprocess, cache: str, *, out_of_fold: bool) -> list[Predictions]:
    """The members' predictions recomputed with test-time augmentation (same images, same order). Out of fold,
    each cell is scored by the one fold model that validated on it; otherwise by the whole member."""
    crops, usable = _crops(preds[0].path, preprocess, cache)
    if not usable.all():
        raise AlldetectError(f"{np.count_nonzero(~usable)} cell image(s) scored in training can no longer be read")
    cpu = torch.device("cpu")
    if not out_of_fold or not members[0].cross_fitted:
        probs = score_members([folder.load_member(e).eval() for e in entries], crops, device=cpu, precision="fp32",
                              tta=True)
        return [replace(p, prob_all=probs[k]) for k, p in enumerate(preds)]
    position = {path: i for i, path in enumerate(preds[0].path)}
    rescored = []
    for member, entry, p in zip(members, entries, preds):
        prob = np.full(len(p.path), np.nan)
        for run, weights, sha256 in zip(member.folds, entry.weights, entry.sha256):
            held_out = np.array([position[q] for q in run.predictions("val").path])
            fold_model = folder.load_member(replace(entry, weights=[weights], sha256=[sha256])).eval()
            prob[held_out] = score_members([fold_model], crops[held_out], device=cpu, precision="fp32", tta=True)[0]
        rescored.append(replace(p, prob_all=prob))
    return rescored


def _crops(paths: list[str], preprocess: Preprocess, cache: str) -> tuple[np.ndarray, np.ndarray]:
    loaded = load_crops(paths, preprocess, cache_dir=cache)
    return np.asarray(loaded.images)[loaded.usable], loaded.usable


def check_bf16(folder: EnsembleFolder, *, cells: int = 64, tolerance: float = BF16_TOLERANCE) -> dict:
    """Score up to ``cells`` validation cells with every member in fp32 and in bf16. A member whose P(ALL) bf16
    moves by more than ``tolerance`` on average runs in fp32 wherever the ensemble would use bf16 (some networks
    are far more sensitive than others). The verdict goes into ``ensemble.json`` under ``bf16``."""
    spec = folder.spec
    members = [m.eval() for m in folder.load_members()]
    crops = folder.calibration()[0][:cells]
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
    folder.save_spec(spec)
    return verdict


def training_domain(manifest: str | Path, crop: int) -> DomainReference:
    """The domain reference of the labelled training and validation cells of ``manifest``, measured on their
    ``crop`` px center crops."""
    rows = [r for r in read_manifest(manifest) if r.label and r.split in ("train", "val")]
    rows = rows[::max(1, -(-len(rows) // DOMAIN_CELLS))]
    measures, readable, problems = measure_images([r.path for r in rows], crop)
    for e in problems:
        logger.warning("%s: left out of the domain reference (%s)", e.path, e.reason)
    if len(readable) < 2:
        raise AlldetectError(f"{manifest}: fewer than two readable training cells to fit the domain reference on")
    return fit_domain(measures, [rows[i].subject or rows[i].path for i in readable], crop)
