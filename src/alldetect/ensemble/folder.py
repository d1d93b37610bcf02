"""Writing and reading the parts of an ensemble folder besides the spec: fitted predictions, member weights,
calibration crops, the domain reference, a description of the training data."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from ..data.domain import DomainReference
from ..data.index import synthetic_marker
from ..errors import AlldetectError, first_line
from ..evaluation.metrics import classification_metrics
from ..evaluation.operating_point import fit_operating_point
from ..formats.labels import Label
from ..formats.manifest import read_manifest
from ..formats.predictions import Predictions, write_prediction_blocks
from ..models import Member, create_member
from ..models.folds import FoldAverage
from .combiners import METHODS, EnsembleFit, fit_combiner
from .spec import SPEC_NAME, EnsembleSpec, MemberEntry, SpecError, load_ensemble_spec

CALIBRATION_NAME = "calibration.npz"
CALIBRATION_CELLS = 128  # validation crops kept in the folder for int8 calibration and the bf16 check
DOMAIN_NAME = "domain.json"


def write_ensemble(out: Path, members: list[MemberEntry], splits: dict[str, list[Predictions]], *,
                   default_method: str, tta: bool, data: dict, versions: dict, operating_point: str = "paper",
                   target: float | None = None, cross_fitted: bool = False) -> EnsembleSpec:
    """Fit every combiner, and each combiner's operating point (``paper``: 0.5; else the criterion of
    ``fit_operating_point``), on the validation split; write the predictions of every split and the spec."""
    if default_method not in METHODS:
        raise AlldetectError(f"unknown method {default_method!r}; known: {', '.join(METHODS)}")
    val = splits["val"]
    y_val, val_probs = val[0].y, np.stack([p.prob_all for p in val])
    fits = {method: fit_combiner(method, y_val, val_probs) for method in METHODS}
    for split, preds in splits.items():
        _write_split(out / f"predictions_{split}.csv", preds, fits)
    points = {}
    if operating_point != "paper":
        donors = val[0].subject or val[0].path
        source = (f"{'out-of-fold' if cross_fitted else 'validation'} predictions of {len(set(donors))} donors "
                  f"({len(y_val)} cells)")
        points = {method: fit_operating_point(y_val, fit.apply(val_probs), donors, criterion=operating_point,
                                              target=target, fitted_on=source) for method, fit in fits.items()}
    spec = EnsembleSpec(members, fits, default_method, data,
                        {p.model: classification_metrics(y_val, p.prob_all) for p in val}, tta, None, versions,
                        points, cross_fitted)
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


def record_graph(ens_dir: str | Path, graph: Path, *, written: bool) -> None:
    """Keep ``ensemble.json``'s hash of a graph of the folder in step with the file: recorded when ``written``,
    forgotten when it is about to be replaced. The ONNX engine refuses a graph whose hash differs (a replaced
    graph would otherwise be trusted). Graphs outside the folder are not recorded."""
    ens_dir = Path(ens_dir)
    if graph.resolve().parent != ens_dir.resolve():
        return
    spec = load_ensemble_spec(ens_dir)
    if written:
        spec.graphs[graph.name] = sha256_file(graph)
    else:
        spec.graphs.pop(graph.name, None)
    spec.save(ens_dir)


def record_domain(ens_dir: str | Path, reference: DomainReference) -> None:
    """Write the domain reference into the folder and its hash into the spec."""
    ens_dir = Path(ens_dir)
    path = ens_dir / DOMAIN_NAME
    path.write_text(json.dumps(reference.to_json(), indent=1))
    spec = load_ensemble_spec(ens_dir)
    spec.domain = sha256_file(path)
    spec.save(ens_dir)


def load_domain(ens_dir: str | Path, spec: EnsembleSpec) -> DomainReference | None:
    """The folder's domain reference, after checking it is the file the spec recorded; None for a folder built
    without one."""
    if spec.domain is None:
        return None
    path = Path(ens_dir) / DOMAIN_NAME
    try:
        data = path.read_bytes()
    except OSError as e:
        raise SpecError(f"{path}: the domain reference is not readable ({e.strerror or e})") from None
    if hashlib.sha256(data).hexdigest() != spec.domain:
        raise SpecError(f"{path}: does not match the hash recorded in ensemble.json (file damaged or replaced); "
                        "copy the ensemble folder again")
    try:
        return DomainReference.from_json(json.loads(data))
    except (ValueError, KeyError, TypeError) as e:
        raise SpecError(f"{path}: not a domain reference this alldetect reads ({first_line(e)})") from None


def model_id(ens_dir: str | Path) -> str:
    """A short fingerprint of the ensemble spec (served by the web app and recorded with every prediction)."""
    return sha256_file(Path(ens_dir) / SPEC_NAME)[:12]


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
    return {"dataset": dataset, "synthetic": marker is not None, "protocol": protocol, "counts": counts}


def _write_split(path: Path, preds: list[Predictions], fits: dict[str, EnsembleFit]) -> None:
    ref = preds[0]
    probs = np.stack([p.prob_all for p in preds])
    labels = [Label(y).text for y in ref.y]
    blocks = {p.model: p.prob_all for p in preds} | {method: fit.apply(probs) for method, fit in fits.items()}
    write_prediction_blocks(path, ref.path, labels, blocks, subjects=ref.subject,
                            extra={f"prob_{p.model}": p.prob_all for p in preds})


def load_member(ens_dir: Path, entry: MemberEntry) -> Member | FoldAverage:
    """A member from its safetensors file(s), after checking each file is the one the spec recorded; a member
    with one file per fold model scores as their average."""
    folds = [_load_weights(ens_dir / weights, sha256, entry.name) for weights, sha256 in zip(entry.weights,
                                                                                            entry.sha256)]
    return folds[0] if len(folds) == 1 else FoldAverage(folds)


def _load_weights(path: Path, sha256: str, name: str) -> Member:
    try:
        data = path.read_bytes()  # read once: hashed, then parsed from the same bytes
    except FileNotFoundError:
        raise SpecError(f"{path}: member weights not found") from None
    except OSError as e:
        raise SpecError(f"{path}: member weights not readable ({e.strerror or e})") from None
    if hashlib.sha256(data).hexdigest() != sha256:
        raise SpecError(f"{path}: the weights do not match the hash recorded in ensemble.json (file damaged, "
                        "truncated or replaced); copy the ensemble folder again")
    try:
        state = load_safetensors(data)
    except SafetensorError as e:
        raise SpecError(f"{path}: not readable member weights ({e})") from None
    model = create_member(name)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise SpecError(f"{path}: does not match the installed {name} ({first_line(e)})") from None
    return model
