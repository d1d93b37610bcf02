"""The ensemble folder: the unit a user copies, and the one owner of its file names. Everything scoring needs lies
inside it, under relative paths:

    ensemble.json                 the spec (members, preprocessing, fitted combiners and their operating points,
                                  default method, TTA)
    members/<name>/weights.safetensors   each member's weights (tensors only: loading runs no code); a member
                                  cross-fitted on K folds of donors has members/<name>/fold<k>/weights.safetensors
                                  for each fold model, and scores as their average
    members/<name>[/fold<k>]/{config.json,history.csv,epochs.csv,metrics.json}   training records (curves, card)
    calibration.npz               a sample of validation crops (int8 calibration, bf16 check)
    domain.json                   what the training cells look like: the domain check's reference (hashed)
    predictions_{val,test}.csv    every member and every method (the ``model`` column tells them apart); for a
                                  cross-fitted ensemble, val holds the out-of-fold predictions of every donor
    ensemble.onnx, ensemble.int8.onnx   the exported graphs (hashed)
    MODEL_CARD.md, report.md, table4.json, figures

Provenance (the run folders, the manifest, versions, weight hashes) is recorded as information, never followed
as a path. ``ensemble.json`` is read and validated once per ``EnsembleFolder``: every engine, the card, the report
and the web app built from one folder object share that one reading.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from ..data.domain import DomainReference
from ..errors import first_line
from ..models import Member, create_member
from ..models.folds import FoldAverage
from .spec import EnsembleSpec, MemberEntry, SpecError, parse_spec

CALIBRATION_CELLS = 128  # validation crops kept in the folder for int8 calibration and the bf16 check
GRAPH_METADATA_PREFIX = "alldetect."  # of the keys in an exported graph's metadata


class EnsembleFolder:
    """An ensemble folder on disk. ``spec`` is parsed on first use and kept; ``save_spec`` writes it back."""
    SPEC = "ensemble.json"
    CALIBRATION = "calibration.npz"
    DOMAIN = "domain.json"
    CARD = "MODEL_CARD.md"
    REPORT = "report.md"
    TABLE4 = "table4.json"
    GRAPH = "ensemble.onnx"
    GRAPH_INT8 = "ensemble.int8.onnx"
    GRADCAM = "gradcam"

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._spec: EnsembleSpec | None = None
        self._spec_sha256 = ""
        self._domain: tuple[str, DomainReference] | None = None  # the reference read, with the hash it had

    @classmethod
    def of(cls, folder: EnsembleFolder | str | Path) -> EnsembleFolder:
        """``folder`` itself, or the folder at that path."""
        return folder if isinstance(folder, EnsembleFolder) else cls(folder)

    def __repr__(self) -> str:
        return f"EnsembleFolder({str(self.path)!r})"

    @property
    def spec(self) -> EnsembleSpec:
        if self._spec is None:
            self._read_spec()
        return self._spec

    def _read_spec(self) -> None:
        path = self.path / self.SPEC
        if self.path.is_file():
            raise SpecError(f"{self.path}: is a file; pass the ensemble folder (the one holding {self.SPEC})")
        if not path.exists():
            raise SpecError(f"{path}: not found; build it with `alldetect ensemble RUN_DIR... --out "
                            f"{self.path}`")
        data = read_folder_file(path, "ensemble spec")
        self._spec, self._spec_sha256 = parse_spec(data, path), hashlib.sha256(data).hexdigest()

    def save_spec(self, spec: EnsembleSpec) -> None:
        """Write ``spec`` as the folder's ``ensemble.json`` (atomically) and keep it as the parsed one."""
        data = spec.to_bytes()
        path = self.path / self.SPEC
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data)
        tmp.replace(path)
        self._spec, self._spec_sha256 = spec, hashlib.sha256(data).hexdigest()

    @property
    def model_id(self) -> str:
        """A short fingerprint of the spec (served by the web app and recorded with every prediction)."""
        if self._spec is None:
            self._read_spec()
        return self._spec_sha256[:12]

    def predictions(self, split: str) -> Path:
        return self.path / f"predictions_{split}.csv"

    @property
    def report_split(self) -> str:
        """The split the report and its Grad-CAM examples come from: test when the folder has its predictions."""
        return "test" if self.predictions("test").is_file() else "val"

    def graph(self, *, int8: bool = False) -> Path:
        return self.path / (self.GRAPH_INT8 if int8 else self.GRAPH)

    def load_member(self, entry: MemberEntry) -> Member | FoldAverage:
        """A member from its safetensors file(s), after checking each file is the one the spec recorded; a member
        with one file per fold model scores as their average."""
        folds = [_load_weights(self.path / weights, sha256, entry.name, entry.colour)
                 for weights, sha256 in zip(entry.weights, entry.sha256)]
        return folds[0] if len(folds) == 1 else FoldAverage(folds)

    def load_members(self) -> list[Member | FoldAverage]:
        return [self.load_member(entry) for entry in self.spec.members]

    def write_calibration(self, crops: np.ndarray, labels: np.ndarray) -> None:
        np.savez(self.path / self.CALIBRATION, crops=crops, labels=labels)

    def calibration(self) -> tuple[np.ndarray, np.ndarray]:
        """The validation crops and labels kept in the folder for int8 calibration and the bf16 check."""
        path = self.path / self.CALIBRATION
        if not path.exists():
            raise SpecError(f"{path}: not found; rebuild the ensemble, or pass --calibration with cell images")
        try:
            with np.load(io.BytesIO(read_folder_file(path, "calibration cells")), allow_pickle=False) as data:
                return data["crops"], data["labels"]
        except (OSError, ValueError, KeyError) as e:
            raise SpecError(f"{path}: unreadable ({e})") from None

    def record_graph(self, graph: Path, *, written: bool) -> None:
        """Keep the spec's hash of a graph of the folder in step with the file: recorded when ``written``,
        forgotten when it is about to be replaced. The ONNX engine refuses a graph whose hash differs (a replaced
        graph would otherwise be trusted). Graphs outside the folder are not recorded."""
        if graph.resolve().parent != self.path.resolve():
            return
        spec = self.spec
        if written:
            spec.graphs[graph.name] = sha256_file(graph)
        else:
            spec.graphs.pop(graph.name, None)
        self.save_spec(spec)

    def check_graph(self, graph: Path) -> bool:
        """Whether the spec records a hash for ``graph`` (False: a folder exported before alldetect recorded graph
        hashes, see ``EnsembleSpec.hashes_graphs``); a graph whose hash differs, or that has none in a folder that
        records them, is refused, as member weights are."""
        recorded = self.spec.graphs.get(graph.name)
        if recorded is None and self.spec.hashes_graphs:
            raise SpecError(f"{graph}: no hash of this graph is recorded in {self.SPEC}, which records every file's "
                            f"(a graph added or replaced after the export); export it again with `alldetect export "
                            f"{self.path}`")
        if recorded is not None and sha256_file(graph, kind="graph") != recorded:
            raise SpecError(f"{graph}: the graph does not match the hash recorded in {self.SPEC} (file damaged, "
                            f"truncated or replaced); export it again with `alldetect export {self.path}`")
        return recorded is not None

    def card(self) -> str:
        """The model card's text, read by the folder's rules: a regular file inside the folder (a link out of it is
        refused), within its size limit."""
        path = self.path / self.CARD
        if os.path.realpath(path) != os.path.join(os.path.realpath(self.path), self.CARD):
            raise SpecError(f"{path}: model card refused: a link out of the folder")
        return read_folder_file(path, "model card").decode("utf-8", errors="replace")

    def record_domain(self, reference: DomainReference) -> None:
        """Write the domain reference into the folder and its hash into the spec."""
        path = self.path / self.DOMAIN
        path.write_text(json.dumps(reference.to_json(), indent=1))
        spec = self.spec
        spec.domain = sha256_file(path, kind="domain reference")
        self.save_spec(spec)

    def domain(self) -> DomainReference | None:
        """The folder's domain reference, after checking it is the file the spec recorded (read once); None for a
        folder built without one."""
        if self.spec.domain is None:
            return None
        if self._domain is not None and self._domain[0] == self.spec.domain:
            return self._domain[1]
        path = self.path / self.DOMAIN
        data = read_folder_file(path, "domain reference")
        if hashlib.sha256(data).hexdigest() != self.spec.domain:
            raise SpecError(f"{path}: does not match the hash recorded in {self.SPEC} (file damaged or replaced); "
                            "copy the ensemble folder again")
        try:
            reference = DomainReference.from_json(json.loads(data))
        except (ValueError, KeyError, TypeError, RecursionError) as e:
            raise SpecError(f"{path}: not a domain reference this alldetect reads ({first_line(e)})") from None
        self._domain = (self.spec.domain, reference)
        return reference


# the largest file of each kind a folder may hold: far above any real one (VGG-16's weights are 0.5 GB, the
# five-member fp32 graph 1.2 GB), far below what would exhaust a lab server's memory
SIZE_LIMITS = {"ensemble spec": 16 << 20, "domain reference": 16 << 20, "calibration cells": 1 << 30,
               "member weights": 2 << 30, "graph": 8 << 30, "model card": 4 << 20}


def _opened(path: Path, kind: str) -> int:
    """A descriptor of ``path`` once it is known to be a regular file within ``SIZE_LIMITS[kind]``; opened without
    blocking, so a named pipe is refused instead of waited on."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise SpecError(f"{path}: {kind} not found") from None
    except (OSError, ValueError) as e:  # ValueError: a NUL byte in the path
        raise SpecError(f"{path}: {kind} not readable ({getattr(e, 'strerror', None) or first_line(e)})") from None
    info = os.fstat(fd)
    problem = None if stat.S_ISREG(info.st_mode) else "not a regular file (a pipe, device, socket or folder)"
    if problem is None and info.st_size > SIZE_LIMITS[kind]:
        problem = f"{info.st_size:,} bytes, more than any {kind} (at most {SIZE_LIMITS[kind]:,})"
    if problem:
        os.close(fd)
        raise SpecError(f"{path}: {kind} refused: {problem}")
    return fd


def read_folder_file(path: Path, kind: str) -> bytes:
    """The bytes of a file of the folder, checked first (``_opened``)."""
    with os.fdopen(_opened(path, kind), "rb") as f:
        return f.read(SIZE_LIMITS[kind] + 1)


def sha256_file(path: str | Path, *, kind: str = "graph") -> str:
    digest = hashlib.sha256()
    with os.fdopen(_opened(Path(path), kind), "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _load_weights(path: Path, sha256: str, name: str, colour: str) -> Member:
    data = read_folder_file(path, "member weights")  # read once: hashed, then parsed from the same bytes
    if hashlib.sha256(data).hexdigest() != sha256:
        raise SpecError(f"{path}: the weights do not match the hash recorded in ensemble.json (file damaged, "
                        "truncated or replaced); copy the ensemble folder again")
    try:
        state = load_safetensors(data)
    except SafetensorError as e:
        raise SpecError(f"{path}: not readable member weights ({e})") from None
    model = create_member(name, colour=colour)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise SpecError(f"{path}: does not match the installed {name} ({first_line(e)})") from None
    return model
