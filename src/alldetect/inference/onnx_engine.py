"""The exported ONNX graph as an engine, on onnxruntime (CPU)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..data.domain import DomainReference
from ..data.geometry import Preprocess
from ..data.transforms import dihedral_views
from ..ensemble.combiners import Combiner
from ..ensemble.folder import GRAPH_METADATA_PREFIX, EnsembleFolder
from ..errors import AlldetectError, require_extra
from ..formats.operating_point import PAPER_POINT, OperatingPoint
from .engine import Engine

logger = logging.getLogger(__name__)


@dataclass
class OnnxEngine(Engine):
    """The exported graph on onnxruntime (CPU)."""
    session: object
    names: list[str]
    combiner: Combiner
    method: str
    preprocess: Preprocess
    input_dtype: str
    precision: str = "fp32"  # of the graph: fp32 or int8
    default_tta: bool = False  # the combiners were fitted on test-time-augmented probabilities
    operating_point: OperatingPoint = PAPER_POINT
    domain: DomainReference | None = None  # what the training cells look like (None: no domain check)

    @classmethod
    def from_folder(cls, folder: EnsembleFolder | str | Path, *, method: str | None = None,
                    path: str | Path | None = None, threads: int | None = None,
                    precision: str = "fp32") -> OnnxEngine:
        """Open the folder's ``ensemble.onnx`` (or ``ensemble.int8.onnx``); refuse a graph whose hash differs from
        the one recorded at export, or whose members or preprocessing differ from the spec. A ``path`` the caller
        names is opened as it is."""
        folder = EnsembleFolder.of(folder)
        spec = folder.spec
        named = path is not None
        path = Path(path) if named else folder.graph(int8=precision == "int8")
        if not path.is_file():
            raise AlldetectError(f"{path}: not found; create it with `alldetect export {folder.path}`")
        if not named and not folder.check_graph(path):
            logger.warning("%s: no hash of this graph is recorded in %s (exported by an earlier alldetect); export "
                           "again so that a replaced graph is refused", path, folder.SPEC)
        session = onnx_session(path, threads=threads)
        meta = {k.removeprefix(GRAPH_METADATA_PREFIX): v
                for k, v in session.get_modelmeta().custom_metadata_map.items()}
        names = json.loads(meta.get("members", "[]"))
        if names != spec.names:
            raise AlldetectError(f"{path}: holds members {names}, the ensemble has {spec.names}; export it again")
        preprocess = graph_preprocess(meta)
        if preprocess != spec.preprocess:
            raise AlldetectError(f"{path}: expects {preprocess}, the ensemble's spec says {spec.preprocess}; export "
                                 "it again")
        method = method or spec.default_method
        return cls(session, names, spec.fit(method), method, preprocess, meta.get("input_dtype", "uint8"),
                   meta.get("precision", "fp32"), spec.tta, spec.operating_point(method), folder.domain())

    def member_probs(self, crops: np.ndarray, *, tta: bool = False) -> np.ndarray:
        out = np.zeros((len(self.names), len(crops)))
        for start in range(0, len(crops), self.batch_size):
            x = torch.from_numpy(np.ascontiguousarray(crops[start:start + self.batch_size]))
            views = [v.permute(0, 2, 3, 1) for v in dihedral_views(x.permute(0, 3, 1, 2))] if tta else [x]
            runs = [self.session.run(["member_prob_all"], {"images": self._cast(v)})[0] for v in views]
            out[:, start:start + len(x)] = np.mean(runs, axis=0).T
        return out

    def _cast(self, x: torch.Tensor) -> np.ndarray:
        x = x.contiguous().numpy()
        return x if self.input_dtype == "uint8" else (x.astype(np.float32) / 255)


def graph_preprocess(meta: dict[str, str]) -> Preprocess:
    """The preprocessing an exported graph's metadata records (graphs before ``preprocess`` had crop/input_size)."""
    raw = json.loads(meta["preprocess"]) if "preprocess" in meta else \
        {"crop": int(meta.get("crop", 0)), "input_size": int(meta["input_size"]) if meta.get("input_size") else None}
    return Preprocess.from_json(raw)


def onnx_session(path: str | Path, *, threads: int | None = None):
    """An onnxruntime CPU session for the graph at ``path`` (``threads``: intra-op threads, default all)."""
    require_extra("onnx", "the ONNX engine")
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
