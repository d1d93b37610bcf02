"""An ensemble directory: member runs combined by every method, and a spec that predict/export/serve load.

Layout: ``ensemble.json`` (members with checkpoints and preprocessing, fitted methods, the default
method, the data it was trained on) and ``predictions_{val,test}.csv`` holding every member and every
method (the ``model`` column tells them apart, member probabilities as extra columns).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

import numpy as np

from .data.index import synthetic_marker
from .data.manifest import read_manifest
from .ensemble import METHODS, EnsembleFit, fit_combiner
from .errors import AlldetectError, DataError
from .metrics import classification_metrics
from .predictions import Predictions, read_predictions, write_prediction_blocks

logger = logging.getLogger(__name__)
SPEC_FORMAT = "alldetect-ensemble"
DEFAULT_METHOD = "wen_kappa"  # the paper's proposed model


def build_ensemble_dir(run_dirs: list[str | Path], out: str | Path, *, default_method: str = DEFAULT_METHOD) -> dict:
    """Read member runs, fit every combiner on validation, write predictions and ``ensemble.json``."""
    if default_method not in METHODS:
        raise AlldetectError(f"unknown method {default_method!r}; known: {', '.join(METHODS)}")
    runs = [Path(r).resolve() for r in run_dirs]
    if len(runs) < 2:
        raise AlldetectError("an ensemble needs at least two member runs")
    members = [_member_entry(run) for run in runs]
    names = [m["name"] for m in members]
    if len(set(names)) != len(names):
        raise AlldetectError(f"the same member appears twice: {names}")
    for key in ("crop", "input_size"):
        if len({m[key] for m in members}) > 1:
            raise AlldetectError(f"members disagree on {key}: " + ", ".join(f"{m['name']}={m[key]}" for m in members))

    splits = {split: _aligned([_single(run / f"predictions_{split}.csv") for run in runs], runs, split)
              for split in ("val", "test") if all((run / f"predictions_{split}.csv").is_file() for run in runs)}
    if "val" not in splits:
        raise AlldetectError("every member run needs predictions_val.csv: weights are fitted on validation")
    val = splits["val"]
    y_val, val_probs = val[0].y, np.stack([p.prob_all for p in val])
    fits = {method: fit_combiner(method, y_val, val_probs) for method in METHODS}

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for split, preds in splits.items():
        _write_split(out / f"predictions_{split}.csv", preds, fits)
    spec = {
        "format": SPEC_FORMAT, "version": 1,
        "members": members,
        "methods": {m: asdict(f) for m, f in fits.items()},
        "default_method": default_method,
        "data": describe_data(members[0]["manifest"]),
        "val_metrics": {p.model: classification_metrics(y_val, p.prob_all) for p in val},
    }
    (out / "ensemble.json").write_text(json.dumps(spec, indent=2))
    return spec


def load_ensemble_spec(ens_dir: str | Path) -> dict:
    path = Path(ens_dir) / "ensemble.json"
    if not path.is_file():
        raise AlldetectError(f"{path}: not found; build it with `alldetect ensemble RUN_DIR... --out {ens_dir}`")
    spec = json.loads(path.read_text())
    if spec.get("format") != SPEC_FORMAT or spec.get("version") != 1:
        raise AlldetectError(f"{path}: not an ensemble spec this version of alldetect can read")
    unknown = set(spec["methods"]) - set(METHODS)
    if unknown:
        raise AlldetectError(f"{path}: methods {sorted(unknown)} are unknown to the installed alldetect")
    return spec


def method_fit(spec: dict, method: str) -> EnsembleFit:
    if method not in spec["methods"]:
        raise AlldetectError(f"method {method!r} is not in this ensemble; it has {', '.join(spec['methods'])}")
    return EnsembleFit(**spec["methods"][method])


def describe_data(manifest: str) -> dict:
    """What the runs were trained on and how it was split, for the first line of every report."""
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
    protocol = ("paper protocol (Table 3): training folds split 70/30 by subject, preliminary test set = test"
                if paper else "subject-level split, stratified by class")
    return {"dataset": dataset, "synthetic": marker is not None, "protocol": protocol, "manifest": manifest}


def _member_entry(run: Path) -> dict:
    config_file = run / "config.json"
    if not config_file.is_file():
        raise AlldetectError(f"{run}: not a training run directory (no config.json)")
    cfg = json.loads(config_file.read_text())["config"]
    checkpoint = run / "checkpoints" / "best.pt"
    if not checkpoint.is_file():
        raise AlldetectError(f"{run}: training has not finished (no checkpoints/best.pt)")
    return {"name": cfg["member"], "run": str(run), "checkpoint": str(checkpoint), "crop": cfg["crop"],
            "input_size": cfg["input_size"], "manifest": cfg["manifest"]}


def _single(path: Path) -> Predictions:
    models = read_predictions(path)
    if len(models) != 1:
        raise DataError(f"{path}: expected one model's predictions, found {', '.join(models)}")
    return next(iter(models.values()))


def _aligned(preds: list[Predictions], runs: list[Path], split: str) -> list[Predictions]:
    """Reorder every member to the first member's image order; refuse different images or labels."""
    ref = preds[0]
    ref_paths = set(ref.path)
    out = [ref]
    for p, run in zip(preds[1:], runs[1:]):
        paths = set(p.path)
        if paths != ref_paths:
            only_ref, only_p = sorted(ref_paths - paths), sorted(paths - ref_paths)
            raise DataError(f"{split}: {runs[0].name} and {run.name} cover different images: "
                            f"{len(only_ref)} only in {runs[0].name} (e.g. {only_ref[:2]}), "
                            f"{len(only_p)} only in {run.name} (e.g. {only_p[:2]}); train members on one manifest")
        order = {path: i for i, path in enumerate(p.path)}
        idx = np.array([order[path] for path in ref.path])
        reordered = Predictions(ref.path, p.y[idx], p.prob_all[idx], p.model, ref.subject)
        mismatch = np.flatnonzero(reordered.y != ref.y)
        if len(mismatch):
            raise DataError(f"{split}: {runs[0].name} and {run.name} disagree on the label of "
                            f"{len(mismatch)} image(s), e.g. {ref.path[mismatch[0]]}")
        out.append(reordered)
    return out


def _write_split(path: Path, preds: list[Predictions], fits: dict[str, EnsembleFit]) -> None:
    ref = preds[0]
    probs = np.stack([p.prob_all for p in preds])
    labels = ["all" if y == 1 else "hem" if y == 0 else "" for y in ref.y]
    blocks = {p.model: p.prob_all for p in preds} | {method: fit.apply(probs) for method, fit in fits.items()}
    write_prediction_blocks(path, ref.path, labels, blocks, subjects=ref.subject,
                            extra={f"prob_{p.model}": p.prob_all for p in preds})
