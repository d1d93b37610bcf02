"""Finished member runs, read as the ensemble needs them: config, selected weights, predictions per split, and
the fold runs of a cross-fitted member grouped, with their out-of-fold predictions."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..data.geometry import Preprocess
from ..data.index import synthetic_marker
from ..errors import AlldetectError, DataError
from ..formats.manifest import read_manifest
from ..formats.predictions import Predictions, read_predictions
from ..training.run_dir import RunDir


@dataclass
class MemberRun:
    """A finished training run, as the ensemble builder reads it."""
    folder: RunDir
    config: dict
    metrics: dict

    @property
    def path(self) -> Path:
        return self.folder.path

    @property
    def name(self) -> str:
        return self.config["member"]

    def predictions(self, split: str) -> Predictions:
        return _single(self.folder.predictions(split))


@dataclass
class MemberRuns:
    """One member's runs: a single run, or the K fold models of a cross-fit (each validated on the donors the
    others trained on, so together their validation predictions are out of fold for every donor)."""
    folds: list[MemberRun]

    @property
    def name(self) -> str:
        return self.folds[0].name

    @property
    def config(self) -> dict:
        return self.folds[0].config

    @property
    def cross_fitted(self) -> bool:
        return len(self.folds) > 1


def read_runs(run_dirs: list[str | Path]) -> list[MemberRuns]:
    """Finished member runs that can be combined, grouped by member: several runs of one member are its fold
    models and must validate on disjoint donors; every member has the same number of runs, and all share one
    crop and input size."""
    runs = []
    for run in (RunDir(Path(r).resolve(), writes=False) for r in run_dirs):
        if not (run.path / run.CONFIG).is_file():
            raise AlldetectError(f"{run.path}: not a training run directory (no {run.CONFIG})")
        if not run.finished:
            raise AlldetectError(f"{run.path}: training has not finished (no checkpoints/{run.best.name} or "
                                 f"{run.METRICS})")
        runs.append(MemberRun(run, run.config(), run.metrics()))
    grouped: dict[str, list[MemberRun]] = {}
    for run in runs:
        grouped.setdefault(run.name, []).append(run)
    members = [MemberRuns(folds) for folds in grouped.values()]
    if len(members) < 2:
        raise AlldetectError("an ensemble needs at least two members" + (
            f"; all {len(runs)} runs are of {runs[0].name}" if runs else ""))
    if len({len(m.folds) for m in members}) > 1:
        raise AlldetectError("members have different numbers of fold runs: "
                             + ", ".join(f"{m.name}={len(m.folds)}" for m in members))
    if len({Preprocess.from_json(r.config) for r in runs}) > 1:
        raise AlldetectError("members disagree on crop/input_size/colour: "
                             + ", ".join(f"{r.path}={Preprocess.from_json(r.config)}" for r in runs))
    for member in members:
        if member.cross_fitted:
            _check_out_of_fold(member)
    return members


def _check_out_of_fold(member: MemberRuns) -> None:
    """A cross-fit's fold runs validate on disjoint donors, none of which its own run trained on."""
    seen: dict[str, Path] = {}
    for run in member.folds:
        val = run.predictions("val")
        manifest = Path(run.config["manifest"])
        trained = {r.subject for r in read_manifest(manifest) if r.split == "train"} if manifest.is_file() else set()
        for subject in sorted(set(val.subject or [])):
            if subject in seen:
                raise DataError(f"{member.name}: donor {subject} is validated by both {seen[subject]} and "
                                f"{run.path}; fold runs must validate on disjoint donors")
            if subject in trained:
                raise DataError(f"{run.path}: donor {subject} is in its training and validation splits")
            seen[subject] = run.path


def copy_training_record(run: MemberRun, member_dir: Path) -> None:
    member_dir.mkdir(parents=True, exist_ok=True)
    for name in RunDir.RECORDS:
        if (run.path / name).is_file():
            shutil.copyfile(run.path / name, member_dir / name)


def run_predictions(members: list[MemberRuns]) -> dict[str, list[Predictions]]:
    """Each split's predictions of every member, aligned to the first member's image order. A cross-fitted
    member's val predictions are its fold runs' (each donor scored by the one model that did not train on it);
    its test predictions are the mean of its fold models'."""
    splits = {}
    for split in ("val", "test"):
        if all(run.folder.predictions(split).is_file() for m in members for run in m.folds):
            combine = _concatenated if split == "val" else _averaged
            splits[split] = _aligned([combine([run.predictions(split) for run in m.folds])
                                      for m in members], [m.name for m in members], split)
    if "val" not in splits:
        raise AlldetectError("every member run needs predictions_val.csv: weights are fitted on validation")
    return splits


def _concatenated(preds: list[Predictions]) -> Predictions:
    first = preds[0]
    return Predictions([p for x in preds for p in x.path], np.concatenate([x.y for x in preds]),
                       np.concatenate([x.prob_all for x in preds]), first.model,
                       [s for x in preds for s in (x.subject or [""] * len(x.path))])


def _averaged(preds: list[Predictions]) -> Predictions:
    aligned = _aligned(preds, [p.model for p in preds], "test")
    return replace(aligned[0], prob_all=np.mean([p.prob_all for p in aligned], axis=0))


def _single(path: Path) -> Predictions:
    models = read_predictions(path)
    if len(models) != 1:
        raise DataError(f"{path}: expected one model's predictions, found {', '.join(models)}")
    return next(iter(models.values()))


def _aligned(preds: list[Predictions], names: list[str], split: str) -> list[Predictions]:
    """Reorder every member to the first member's image order; refuse different images or labels."""
    ref = preds[0]
    ref_paths = set(ref.path)
    first = names[0]
    out = [ref]
    for p, name in zip(preds[1:], names[1:]):
        paths = set(p.path)
        if paths != ref_paths:
            only_ref, only_p = sorted(ref_paths - paths), sorted(paths - ref_paths)
            raise DataError(f"{split}: {first} and {name} cover different images: "
                            f"{len(only_ref)} only in {first} (e.g. {only_ref[:2]}), "
                            f"{len(only_p)} only in {name} (e.g. {only_p[:2]}); train members on one "
                            "manifest")
        order = {path: i for i, path in enumerate(p.path)}
        idx = np.array([order[path] for path in ref.path])
        reordered = Predictions(ref.path, p.y[idx], p.prob_all[idx], p.model, ref.subject)
        mismatch = np.flatnonzero(reordered.y != ref.y)
        if len(mismatch):
            raise DataError(f"{split}: {first} and {name} disagree on the label of "
                            f"{len(mismatch)} image(s), e.g. {ref.path[mismatch[0]]}")
        out.append(reordered)
    return out


def describe_data(manifest: str, *, folds: int = 1) -> dict:
    """What the runs were trained on and how it was split (``folds``: the number of donor folds when the
    members were cross-fitted), for the first line of every report."""
    rows = read_manifest(manifest)
    labelled = [r for r in rows if r.label]
    marker = synthetic_marker(Path(labelled[0].path).parent) if labelled else None
    sources = {r.source for r in labelled}
    if marker is not None:
        dataset = "SYNTHETIC cells from `alldetect synth` (they test the software, not the medicine)"
    elif any(s.startswith("fold_") for s in sources):
        dataset = "C-NMC-2019"
    else:
        dataset = f"image folder(s): {', '.join(sorted(sources))}"
    paper = bool(labelled) and all((r.split == "test") == (r.source == "prelim") for r in labelled)
    if folds > 1:
        protocol = (f"cross-fitting: donors dealt into {folds} folds stratified by class; each member trained "
                    f"{folds} times on the other folds; val figures are out of fold for every donor")
    elif paper:
        protocol = "paper protocol (Table 3): training folds split 70/30 by subject, preliminary test set = test"
    else:
        protocol = "subject-level split, stratified by class"
    groups = {"every donor, out of fold": ("train", "val")} if folds > 1 else \
        {split: (split,) for split in ("train", "val", "test")}
    counts = {group: {label: {"images": sum(r.split in splits and r.label == label for r in labelled),
                              "subjects": len({r.subject for r in labelled if r.split in splits and r.label == label})}
                      for label in ("all", "hem")} for group, splits in groups.items()}
    return {"dataset": dataset, "synthetic": marker is not None, "protocol": protocol, "counts": counts,
            "batches": sorted(s for s in sources if s)}
