"""Finished member runs, read as the ensemble needs them: config, selected weights, predictions per split."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import AlldetectError, DataError
from ..formats.predictions import Predictions, read_predictions

RECORD_FILES = ("config.json", "history.csv", "epochs.csv", "metrics.json")


@dataclass
class MemberRun:
    """A finished training run, as the ensemble builder reads it."""
    path: Path
    config: dict
    metrics: dict

    @property
    def name(self) -> str:
        return self.config["member"]


def read_runs(run_dirs: list[str | Path]) -> list[MemberRun]:
    """Finished member runs that can be combined: distinct members, one crop and input size, one manifest."""
    runs = []
    for run in map(lambda r: Path(r).resolve(), run_dirs):
        config_file, metrics_file = run / "config.json", run / "metrics.json"
        if not config_file.is_file():
            raise AlldetectError(f"{run}: not a training run directory (no config.json)")
        if not (run / "checkpoints" / "best.pt").is_file() or not metrics_file.is_file():
            raise AlldetectError(f"{run}: training has not finished (no checkpoints/best.pt or metrics.json)")
        runs.append(MemberRun(run, json.loads(config_file.read_text())["config"],
                              json.loads(metrics_file.read_text())))
    if len(runs) < 2:
        raise AlldetectError("an ensemble needs at least two member runs")
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise AlldetectError(f"the same member appears twice: {names}")
    for key in ("crop", "input_size"):
        if len({r.config[key] for r in runs}) > 1:
            raise AlldetectError(f"members disagree on {key}: " + ", ".join(f"{r.name}={r.config[key]}" for r in runs))
    return runs


def copy_training_record(run: MemberRun, member_dir: Path) -> None:
    member_dir.mkdir(parents=True, exist_ok=True)
    for name in RECORD_FILES:
        if (run.path / name).is_file():
            shutil.copyfile(run.path / name, member_dir / name)


def run_predictions(runs: list[MemberRun]) -> dict[str, list[Predictions]]:
    """Each split's predictions of every member, aligned to the first member's image order."""
    splits = {split: _aligned([_single(r.path / f"predictions_{split}.csv") for r in runs], runs, split)
              for split in ("val", "test") if all((r.path / f"predictions_{split}.csv").is_file() for r in runs)}
    if "val" not in splits:
        raise AlldetectError("every member run needs predictions_val.csv: weights are fitted on validation")
    return splits


def _single(path: Path) -> Predictions:
    models = read_predictions(path)
    if len(models) != 1:
        raise DataError(f"{path}: expected one model's predictions, found {', '.join(models)}")
    return next(iter(models.values()))


def _aligned(preds: list[Predictions], runs: list[MemberRun], split: str) -> list[Predictions]:
    """Reorder every member to the first member's image order; refuse different images or labels."""
    ref = preds[0]
    ref_paths = set(ref.path)
    first = runs[0].path.name
    out = [ref]
    for p, run in zip(preds[1:], runs[1:]):
        paths = set(p.path)
        if paths != ref_paths:
            only_ref, only_p = sorted(ref_paths - paths), sorted(paths - ref_paths)
            raise DataError(f"{split}: {first} and {run.path.name} cover different images: "
                            f"{len(only_ref)} only in {first} (e.g. {only_ref[:2]}), "
                            f"{len(only_p)} only in {run.path.name} (e.g. {only_p[:2]}); train members on one "
                            "manifest")
        order = {path: i for i, path in enumerate(p.path)}
        idx = np.array([order[path] for path in ref.path])
        reordered = Predictions(ref.path, p.y[idx], p.prob_all[idx], p.model, ref.subject)
        mismatch = np.flatnonzero(reordered.y != ref.y)
        if len(mismatch):
            raise DataError(f"{split}: {first} and {run.path.name} disagree on the label of "
                            f"{len(mismatch)} image(s), e.g. {ref.path[mismatch[0]]}")
        out.append(reordered)
    return out
