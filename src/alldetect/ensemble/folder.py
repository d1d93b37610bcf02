"""Writing and reading the parts of an ensemble folder besides the spec: fitted predictions, member weights,
calibration crops, a description of the training data."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from ..data.index import synthetic_marker
from ..errors import AlldetectError, first_line
from ..evaluation.metrics import classification_metrics
from ..formats.labels import Label
from ..formats.manifest import read_manifest
from ..formats.predictions import Predictions, write_prediction_blocks
from ..models import Member, create_member
from .combiners import METHODS, EnsembleFit, fit_combiner
from .spec import SPEC_NAME, EnsembleSpec, MemberEntry, SpecError

CALIBRATION_NAME = "calibration.npz"
CALIBRATION_CELLS = 128  # validation crops kept in the folder for int8 calibration and the bf16 check


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


def _write_split(path: Path, preds: list[Predictions], fits: dict[str, EnsembleFit]) -> None:
    ref = preds[0]
    probs = np.stack([p.prob_all for p in preds])
    labels = [Label(y).text for y in ref.y]
    blocks = {p.model: p.prob_all for p in preds} | {method: fit.apply(probs) for method, fit in fits.items()}
    write_prediction_blocks(path, ref.path, labels, blocks, subjects=ref.subject,
                            extra={f"prob_{p.model}": p.prob_all for p in preds})


def load_member(ens_dir: Path, entry: MemberEntry) -> Member:
    """A member from its safetensors file, after checking the file is the one the spec recorded."""
    path = ens_dir / entry.weights
    try:
        data = path.read_bytes()  # read once: hashed, then parsed from the same bytes
    except FileNotFoundError:
        raise SpecError(f"{path}: member weights not found") from None
    except OSError as e:
        raise SpecError(f"{path}: member weights not readable ({e.strerror or e})") from None
    if hashlib.sha256(data).hexdigest() != entry.sha256:
        raise SpecError(f"{path}: the weights do not match the hash recorded in ensemble.json (file damaged, "
                        "truncated or replaced); copy the ensemble folder again")
    try:
        state = load_safetensors(data)
    except SafetensorError as e:
        raise SpecError(f"{path}: not readable member weights ({e})") from None
    model = create_member(entry.name)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise SpecError(f"{path}: does not match the installed {entry.name} ({first_line(e)})") from None
    return model
