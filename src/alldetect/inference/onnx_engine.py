"""The exported ONNX graph as an engine, on onnxruntime (CPU)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..data.domain import DomainReference
from ..data.transforms import dihedral_views
from ..ensemble.combiners import EnsembleFit
from ..ensemble.folder import load_domain, sha256_file
from ..ensemble.spec import EnsembleSpec, load_ensemble_spec
from ..errors import AlldetectError
from ..formats.operating_point import PAPER_POINT, OperatingPoint
from .engine import Engine

logger = logging.getLogger(__name__)
METADATA_PREFIX = "alldetect."  # of the keys in an exported graph's metadata
ONNX_NAME = "ensemble.onnx"
ONNX_INT8_NAME = "ensemble.int8.onnx"


@dataclass
class OnnxEnsemble(Engine):
    """The exported graph on onnxruntime (CPU)."""
    session: object
    names: list[str]
    combiner: EnsembleFit
    method: str
    crop: int
    input_size: int | None
    input_dtype: str
    precision: str = "fp32"  # of the graph: fp32 or int8
    default_tta: bool = False  # the combiners were fitted on test-time-augmented probabilities
    operating_point: OperatingPoint = PAPER_POINT
    domain: DomainReference | None = None  # what the training cells look like (None: no domain check)

    def member_probs(self, crops: np.ndarray, *, tta: bool = False, batch_size: int = 32) -> np.ndarray:
        out = np.zeros((len(self.names), len(crops)))
        for start in range(0, len(crops), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(crops[start:start + batch_size]))
            views = [v.permute(0, 2, 3, 1) for v in dihedral_views(x.permute(0, 3, 1, 2))] if tta else [x]
            runs = [self.session.run(["member_prob_all"], {"images": self._cast(v)})[0] for v in views]
            out[:, start:start + len(x)] = np.mean(runs, axis=0).T
        return out

    def _cast(self, x: torch.Tensor) -> np.ndarray:
        x = x.contiguous().numpy()
        return x if self.input_dtype == "uint8" else (x.astype(np.float32) / 255)


def onnx_session(path: str | Path, *, threads: int | None = None):
    """An onnxruntime CPU session for the graph at ``path`` (``threads``: intra-op threads, default all)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _check_graph(path: Path, spec: EnsembleSpec) -> None:
    """The folder's graph runs only if it is the one ``alldetect export`` recorded, as member weights do."""
    recorded = spec.graphs.get(path.name)
    if recorded is None:
        logger.warning("%s: no hash of this graph is recorded in ensemble.json (exported by an earlier alldetect); "
                       "export again so that a replaced graph is refused", path)
    elif sha256_file(path) != recorded:
        raise AlldetectError(f"{path}: the graph does not match the hash recorded in ensemble.json (file damaged, "
                             f"truncated or replaced); export it again with `alldetect export {path.parent}`")


def load_onnx_ensemble(ens_dir: str | Path, *, method: str | None = None, path: str | Path | None = None,
                       threads: int | None = None, precision: str = "fp32") -> OnnxEnsemble:
    """Open ``ensemble.onnx`` (or ``ensemble.int8.onnx``) of an ensemble directory; refuse a graph whose hash
    differs from the one recorded at export, or whose members differ from the spec. A ``path`` the caller
    names is opened as it is."""
    spec = load_ensemble_spec(ens_dir)
    named = path is not None
    path = Path(path) if named else Path(ens_dir) / (ONNX_INT8_NAME if precision == "int8" else ONNX_NAME)
    if not path.is_file():
        raise AlldetectError(f"{path}: not found; create it with `alldetect export {ens_dir}`")
    if not named:
        _check_graph(path, spec)
    session = onnx_session(path, threads=threads)
    meta = {k.removeprefix(METADATA_PREFIX): v for k, v in session.get_modelmeta().custom_metadata_map.items()}
    names = json.loads(meta.get("members", "[]"))
    expected = spec.names
    if names != expected:
        raise AlldetectError(f"{path}: holds members {names}, the ensemble has {expected}; export it again")
    method = method or spec.default_method
    input_size = int(meta["input_size"]) if meta.get("input_size") else None
    return OnnxEnsemble(session, names, spec.fit(method), method, int(meta["crop"]), input_size,
                        meta.get("input_dtype", "uint8"), meta.get("precision", "fp32"),
                        spec.tta, spec.operating_point(method), load_domain(ens_dir, spec))
