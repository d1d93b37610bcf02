"""The ensemble folder: the unit a user copies. Everything scoring needs lies inside it, under relative paths:

    ensemble.json                 the spec (members, preprocessing, fitted combiners, default method, TTA)
    members/<name>/weights.safetensors   each member's weights (tensors only: loading runs no code)
    members/<name>/{config.json,history.csv,epochs.csv,metrics.json}   its training record, for curves and card
    calibration.npz               a sample of validation crops (int8 calibration, bf16 check)
    predictions_{val,test}.csv    every member and every method (the ``model`` column tells them apart)
    MODEL_CARD.md, report.md, figures, ONNX graphs when exported

Provenance (the run folders, the manifest, versions, weight hashes) is recorded as information, never followed
as a path. The spec is validated when it is read: a damaged or hand-edited file is one line naming the field.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path, PurePosixPath

import numpy as np

from .data.index import synthetic_marker
from .data.manifest import read_manifest
from .ensemble import METHODS, EnsembleFit, fit_combiner
from .errors import AlldetectError, DataError
from .metrics import classification_metrics
from .predictions import Predictions, read_predictions, write_prediction_blocks

logger = logging.getLogger(__name__)
SPEC_NAME = "ensemble.json"
SPEC_FORMAT = "alldetect-ensemble"
SPEC_VERSION = 2
CALIBRATION_NAME = "calibration.npz"
CALIBRATION_CELLS = 128
RECORD_FILES = ("config.json", "history.csv", "epochs.csv", "metrics.json")
DEFAULT_METHOD = "wen_kappa"  # the paper's proposed model


class SpecError(AlldetectError):
    """An ensemble folder that cannot be used as it is."""


@dataclass(frozen=True)
class MemberEntry:
    name: str
    weights: str                  # the safetensors file, relative to the folder
    sha256: str
    crop: int
    input_size: int | None
    mean: list[float] = field(default_factory=list)  # the normalisation the member applies to [0, 1] pixels
    std: list[float] = field(default_factory=list)
    best_epoch: int | None = None
    provenance: dict = field(default_factory=dict)  # information only: run folder, manifest, training config

    @property
    def record_dir(self) -> str:
        return str(PurePosixPath(self.weights).parent)


@dataclass
class EnsembleSpec:
    members: list[MemberEntry]
    methods: dict[str, EnsembleFit]
    default_method: str
    data: dict
    val_metrics: dict = field(default_factory=dict)
    tta: bool = False             # combiners were fitted on test-time-augmented probabilities; score with TTA
    bf16: dict | None = None      # the bf16 check: each member's mean change and those that run in fp32
    versions: dict = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.members]

    @property
    def crop(self) -> int:
        return self.members[0].crop

    @property
    def input_size(self) -> int | None:
        return self.members[0].input_size

    def fit(self, method: str) -> EnsembleFit:
        if method not in self.methods:
            raise AlldetectError(f"method {method!r} is not in this ensemble; it has {', '.join(self.methods)}")
        return self.methods[method]

    def to_json(self) -> dict:
        return {"format": SPEC_FORMAT, "version": SPEC_VERSION, "members": [asdict(m) for m in self.members],
                "methods": {k: asdict(v) for k, v in self.methods.items()}, "default_method": self.default_method,
                "tta": self.tta, "bf16": self.bf16, "data": self.data, "val_metrics": self.val_metrics,
                "versions": self.versions}

    def save(self, ens_dir: str | Path) -> None:
        path = Path(ens_dir) / SPEC_NAME
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2))
        tmp.replace(path)


def load_ensemble_spec(ens_dir: str | Path) -> EnsembleSpec:
    """Read and validate ``ensemble.json``; every problem is one line naming the file and the field."""
    path = Path(ens_dir) / SPEC_NAME
    if Path(ens_dir).is_file():
        raise SpecError(f"{ens_dir}: is a file; pass the ensemble folder (the one holding {SPEC_NAME})")
    if not path.is_file():
        raise SpecError(f"{path}: not found; build it with `alldetect ensemble RUN_DIR... --out {ens_dir}`")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SpecError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict) or raw.get("format") != SPEC_FORMAT:
        raise SpecError(f"{path}: not an alldetect ensemble spec")
    if raw.get("version") == 1:
        raise SpecError(f"{path}: made by an earlier alldetect whose ensembles point at member checkpoints outside "
                        "the folder; rebuild it as a self-contained folder with `alldetect ensemble RUN_DIR... "
                        f"--out {ens_dir}`")
    if raw.get("version") != SPEC_VERSION:
        raise SpecError(f"{path}: version {raw.get('version')!r} is not one this alldetect reads ({SPEC_VERSION})")
    return _validated(raw, path)


def _validated(raw: dict, path: Path) -> EnsembleSpec:
    from .models import member_spec

    def need(obj: dict, key: str, kind: type | tuple, where: str):
        if key not in obj:
            raise SpecError(f"{path}: missing field {where}{key}")
        value = obj[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise SpecError(f"{path}: field {where}{key} is {value!r}, not {_kind_name(kind)}")
        return value

    entries = need(raw, "members", list, "")
    if not entries:
        raise SpecError(f"{path}: field members is empty")
    members = []
    for i, entry in enumerate(entries):
        where = f"members[{i}]."
        if not isinstance(entry, dict):
            raise SpecError(f"{path}: field members[{i}] is not an object")
        name = need(entry, "name", str, where)
        try:
            member_spec(name)
        except AlldetectError as e:
            raise SpecError(f"{path}: field {where}name: {e}") from None
        weights = need(entry, "weights", str, where)
        if PurePosixPath(weights).is_absolute() or ".." in PurePosixPath(weights).parts or "\\" in weights:
            raise SpecError(f"{path}: field {where}weights {weights!r} must be a path inside the folder")
        crop = need(entry, "crop", int, where)
        input_size = entry.get("input_size")
        if crop < 1 or input_size is not None and (not isinstance(input_size, int) or input_size < 1):
            raise SpecError(f"{path}: field {where}crop/input_size ({crop!r}, {input_size!r}) must be positive "
                            "whole numbers")
        members.append(MemberEntry(name, weights, need(entry, "sha256", str, where), crop, input_size,
                                   entry.get("mean") or [], entry.get("std") or [], entry.get("best_epoch"),
                                   entry.get("provenance") or {}))
    if len({(m.crop, m.input_size) for m in members}) > 1:
        raise SpecError(f"{path}: members disagree on crop/input_size")
    if len({m.name for m in members}) < len(members):
        raise SpecError(f"{path}: a member appears twice")
    methods = {name: _validated_fit(name, fit, len(members), path)
               for name, fit in need(raw, "methods", dict, "").items()}
    default = need(raw, "default_method", str, "")
    if default not in methods:
        raise SpecError(f"{path}: field default_method {default!r} is not one of its methods "
                        f"({', '.join(methods)})")
    tta = raw.get("tta", False)
    if not isinstance(tta, bool):
        raise SpecError(f"{path}: field tta is {tta!r}, not true or false")
    return EnsembleSpec(members, methods, default, raw.get("data") or {}, raw.get("val_metrics") or {}, tta,
                        raw.get("bf16"), raw.get("versions") or {})


def _validated_fit(method: str, raw: object, k: int, path: Path) -> EnsembleFit:
    where = f"{path}: field methods.{method}"
    if method not in METHODS:
        raise SpecError(f"{where}: unknown method (known: {', '.join(METHODS)})")
    if not isinstance(raw, dict) or set(raw) - {f.name for f in fields(EnsembleFit)}:
        raise SpecError(f"{where}: not a fitted combiner")

    def numbers(key: str, count: int) -> list[float]:
        values = raw.get(key, [])
        if not isinstance(values, list) or len(values) != count or not all(_finite(v) for v in values):
            raise SpecError(f"{where}.{key} must be {count} finite number(s), got {values!r}")
        return [float(v) for v in values]

    if method == "ts_sap":
        temperatures = numbers("temperatures", k)
        if min(temperatures) <= 0:
            raise SpecError(f"{where}.temperatures must be positive, got {temperatures}")
        return EnsembleFit(method, temperatures=temperatures)
    if method == "stacking":
        intercept = raw.get("intercept", 0.0)
        if not _finite(intercept):
            raise SpecError(f"{where}.intercept must be a finite number, got {intercept!r}")
        return EnsembleFit(method, coef=numbers("coef", k), intercept=float(intercept))
    weights = numbers("weights", k)
    if min(weights) < 0 or sum(weights) <= 0:
        raise SpecError(f"{where}.weights must be non-negative with a positive sum, got {weights}")
    return EnsembleFit(method, weights=weights)


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _kind_name(kind: type | tuple) -> str:
    return {list: "a list", dict: "an object", str: "a string", int: "a whole number"}.get(kind, str(kind))


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


def write_ensemble(out: Path, members: list[MemberEntry], splits: dict[str, list[Predictions]], *,
                   default_method: str, tta: bool, data: dict, versions: dict) -> EnsembleSpec:
    """Fit every combiner on the validation split, write the predictions of every split and the spec."""
    if default_method not in METHODS:
        raise AlldetectError(f"unknown method {default_method!r}; known: {', '.join(METHODS)}")
    val = splits["val"]
    y_val, val_probs = val[0].y, np.stack([p.prob_all for p in val])
    fits = {method: fit_combiner(method, y_val, val_probs) for method in METHODS}
    for split, preds in splits.items():
        _write_split(out / f"predictions_{split}.csv", preds, fits)
    spec = EnsembleSpec(members, fits, default_method, data,
                        {p.model: classification_metrics(y_val, p.prob_all) for p in val}, tta, None, versions)
    spec.save(out)
    return spec


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


def write_calibration(out: Path, crops: np.ndarray, labels: np.ndarray) -> None:
    np.savez(out / CALIBRATION_NAME, crops=crops, labels=labels)


def read_calibration(ens_dir: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """The validation crops and labels kept in the folder for int8 calibration and the bf16 check."""
    path = Path(ens_dir) / CALIBRATION_NAME
    if not path.is_file():
        raise SpecError(f"{path}: not found; rebuild the ensemble, or pass --calibration with cell images")
    try:
        with np.load(path, allow_pickle=False) as data:
            return data["crops"], data["labels"]
    except (OSError, ValueError, KeyError) as e:
        raise SpecError(f"{path}: unreadable ({e})") from None


def model_id(ens_dir: str | Path) -> str:
    """A short fingerprint of the ensemble spec (served by the web app and recorded with every prediction)."""
    return sha256_file(Path(ens_dir) / SPEC_NAME)[:12]


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
    counts = {split: {label: {"images": sum(r.split == split and r.label == label for r in labelled),
                              "subjects": len({r.subject for r in labelled if r.split == split and r.label == label})}
                      for label in ("all", "hem")} for split in ("train", "val", "test")}
    return {"dataset": dataset, "synthetic": marker is not None, "protocol": protocol, "counts": counts}


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


def _write_split(path: Path, preds: list[Predictions], fits: dict[str, EnsembleFit]) -> None:
    ref = preds[0]
    probs = np.stack([p.prob_all for p in preds])
    labels = ["all" if y == 1 else "hem" if y == 0 else "" for y in ref.y]
    blocks = {p.model: p.prob_all for p in preds} | {method: fit.apply(probs) for method, fit in fits.items()}
    write_prediction_blocks(path, ref.path, labels, blocks, subjects=ref.subject,
                            extra={f"prob_{p.model}": p.prob_all for p in preds})
