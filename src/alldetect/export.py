"""The whole ensemble as one ONNX graph, and an onnxruntime engine that runs it.

Graph input ``images``: a batch of cropped RGB cells, NHWC, uint8 (0-255) or float32 (0-1), dynamic batch.
Outputs ``prob_all`` (N,) of the ensemble and ``member_prob_all`` (N, members). Each member's own
normalisation and the ensemble's combiner are inside the graph.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .ensemble import EnsembleFit
from .ensemble_dir import load_ensemble_spec
from .ensemble_model import EnsembleModel, dihedral_views
from .errors import AlldetectError
from .quantize import TOLERANCE

logger = logging.getLogger(__name__)
ONNX_NAME = "ensemble.onnx"
ONNX_INT8_NAME = "ensemble.int8.onnx"
_EPS = 1e-7


class EnsembleGraph(nn.Module):
    """Members plus combiner as one module, for export."""

    def __init__(self, model: EnsembleModel):
        super().__init__()
        self.members = nn.ModuleList(model.members)
        fit = model.combiner
        self.method = fit.method
        k = len(model.members)
        self.register_buffer("weights", torch.tensor(fit.weights or [1.0] * k, dtype=torch.float32))
        self.register_buffer("temperatures", torch.tensor(fit.temperatures or [1.0] * k, dtype=torch.float32))
        self.register_buffer("coef", torch.tensor(fit.coef or [0.0] * k, dtype=torch.float32))
        self.intercept = float(fit.intercept)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = images.permute(0, 3, 1, 2)
        probs = torch.stack([m(x).softmax(dim=1)[:, 1] for m in self.members], dim=1)  # (N, K)
        if self.method == "ts_sap":
            ens = torch.sigmoid(_logit(probs) / self.temperatures).mean(dim=1)
        elif self.method == "stacking":
            ens = torch.sigmoid(_logit(probs) @ self.coef + self.intercept)
        else:
            ens = probs @ self.weights / self.weights.sum()
        return ens, probs


def _logit(p: torch.Tensor) -> torch.Tensor:
    p = p.clamp(_EPS, 1 - _EPS)
    return torch.log(p) - torch.log1p(-p)


def export_onnx(model: EnsembleModel, out: str | Path, *, input_dtype: str = "uint8", opset: int = 18) -> Path:
    """Export ``model`` (on CPU, fp32) to ``out`` and record members and method in the graph's metadata."""
    import onnx

    if input_dtype not in ("uint8", "float32"):
        raise AlldetectError(f"input dtype must be uint8 or float32, not {input_dtype!r}")
    out = Path(out)
    graph = EnsembleGraph(model).cpu().float().eval()
    side = model.input_size or model.crop
    example = torch.zeros(2, side, side, 3, dtype=torch.uint8 if input_dtype == "uint8" else torch.float32)
    batch = torch.export.Dim("batch", min=1, max=65536)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*LeafSpec")  # inside torch.export
        program = torch.onnx.export(graph, (example,), dynamo=True, opset_version=opset, input_names=["images"],
                                    output_names=["prob_all", "member_prob_all"], dynamic_shapes=({0: batch},),
                                    verbose=False)
    program.save(str(out))
    proto = onnx.load(str(out))
    meta = {"members": json.dumps(model.names), "method": model.method, "crop": str(model.crop),
            "input_size": str(model.input_size or ""), "input_dtype": input_dtype, "precision": "fp32"}
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = f"alldetect.{key}", value
    onnx.save(proto, str(out))
    return out


def export_ensemble(ens_dir: str | Path, *, out: str | Path | None = None, method: str | None = None,
                    input_dtype: str = "uint8", int8: bool = True, calibration: list[Path] | None = None,
                    calibration_cells: int = 128, int8_tolerance: float = TOLERANCE) -> dict:
    """Write the fp32 graph (default ``ENS_DIR/ensemble.onnx``) and, with ``int8``, its static int8 copy
    calibrated on validation cells; returns ``{"fp32": path, "int8": quantize_ensemble's summary or None}``."""
    from .ensemble_model import load_ensemble
    from .quantize import calibration_crops, quantize_ensemble

    model = load_ensemble(ens_dir, method=method, device="cpu")
    if int8:  # before the export, so that missing calibration cells fail at once
        crops, labels, source = calibration_crops(ens_dir, model, calibration=calibration, cells=calibration_cells)
    path = export_onnx(model, out or Path(ens_dir) / ONNX_NAME, input_dtype=input_dtype)
    result: dict = {"fp32": path}
    if int8:
        result["int8"] = quantize_ensemble(ens_dir, path, model, crops, labels, source=source,
                                           input_dtype=input_dtype, tolerance=int8_tolerance)
    return result


def describe_int8(summary: dict | None) -> str:
    """One line on the int8 graph: where, calibrated on what, and how far it moves P(ALL) from fp32."""
    if summary is None:
        return "no int8 graph written: int8 moved every member's P(ALL) beyond the tolerance"
    auc = f"; AUC {summary['auc_fp32']:.4f} -> {summary['auc_int8']:.4f}" if summary["auc_fp32"] is not None else ""
    kept = f"; kept fp32: {', '.join(summary['float_members'])}" if summary["float_members"] else ""
    size_mb = summary["path"].stat().st_size / 1e6
    return (f"wrote {summary['path']} ({size_mb:.0f} MB), calibrated on {summary['cells']} "
            f"{summary['source']} cells; on those cells int8 moves the ensemble's P(ALL) by "
            f"{summary['mean_change']:.4f} on average, {summary['max_change']:.4f} at most{auc}{kept}")


@dataclass
class OnnxEnsemble:
    """Same interface as ``EnsembleModel.predict``/``member_probs``, on onnxruntime (CPU)."""
    session: object
    names: list[str]
    combiner: EnsembleFit
    method: str
    crop: int
    input_size: int | None
    input_dtype: str
    precision: str = "fp32"  # of the graph: fp32 or int8
    default_tta: bool = False  # the combiners were fitted on test-time-augmented probabilities

    def member_probs(self, crops: np.ndarray, *, tta: bool = False, batch_size: int = 32) -> np.ndarray:
        out = np.zeros((len(self.names), len(crops)))
        for start in range(0, len(crops), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(crops[start:start + batch_size]))
            views = [v.permute(0, 2, 3, 1) for v in dihedral_views(x.permute(0, 3, 1, 2))] if tta else [x]
            runs = [self.session.run(["member_prob_all"], {"images": self._cast(v)})[0] for v in views]
            out[:, start:start + len(x)] = np.mean(runs, axis=0).T
        return out

    def predict(self, crops: np.ndarray, *, tta: bool = False) -> tuple[np.ndarray, np.ndarray]:
        members = self.member_probs(crops, tta=tta)
        return self.combiner.apply(members), members

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


def load_onnx_ensemble(ens_dir: str | Path, *, method: str | None = None, path: str | Path | None = None,
                       threads: int | None = None, precision: str = "fp32") -> OnnxEnsemble:
    """Open ``ensemble.onnx`` (or ``ensemble.int8.onnx``) of an ensemble directory; refuse a graph whose
    members differ from the spec."""
    spec = load_ensemble_spec(ens_dir)
    path = Path(path) if path else Path(ens_dir) / (ONNX_INT8_NAME if precision == "int8" else ONNX_NAME)
    if not path.is_file():
        raise AlldetectError(f"{path}: not found; create it with `alldetect export {ens_dir}`")
    session = onnx_session(path, threads=threads)
    meta = session.get_modelmeta().custom_metadata_map
    names = json.loads(meta.get("alldetect.members", "[]"))
    expected = spec.names
    if names != expected:
        raise AlldetectError(f"{path}: holds members {names}, the ensemble has {expected}; export it again")
    method = method or spec.default_method
    input_size = int(meta["alldetect.input_size"]) if meta.get("alldetect.input_size") else None
    return OnnxEnsemble(session, names, spec.fit(method), method, int(meta["alldetect.crop"]), input_size,
                        meta.get("alldetect.input_dtype", "uint8"), meta.get("alldetect.precision", "fp32"),
                        spec.tta)


def load_engine(ens_dir: str | Path, *, method: str | None = None, device: str = "auto", engine: str = "auto",
                precision: str = "auto"):
    """``torch``, ``onnx`` (onnxruntime), or ``auto``, the fastest accurate engine measured (BENCHMARKS.md):
    on a CPU the exported int8 graph, else torch in bf16 where the CPU has native bf16, else the exported
    fp32 graph, else torch in fp32; on a GPU torch in bf16. ``precision`` narrows the choice (auto, fp32,
    bf16 on torch, int8 on onnx)."""
    from .ensemble_model import load_ensemble
    from .inference import cpu_has_native_bf16, resolve_device

    if engine not in ("auto", "onnx", "torch"):
        raise AlldetectError(f"engine must be auto, onnx or torch, not {engine!r}")
    if precision not in ("auto", "fp32", "bf16", "int8"):
        raise AlldetectError(f"precision must be auto, fp32, bf16 or int8, not {precision!r}")
    if (engine, precision) in (("torch", "int8"), ("onnx", "bf16")):
        raise AlldetectError(f"precision {precision} runs on the {'onnx' if precision == 'int8' else 'torch'} "
                             f"engine, not {engine}")
    ens_dir = Path(ens_dir)
    on_cpu = resolve_device(device).type == "cpu"
    has_int8, has_fp32 = (ens_dir / ONNX_INT8_NAME).is_file(), (ens_dir / ONNX_NAME).is_file()
    if engine == "onnx" or precision == "int8":
        int8 = precision == "int8" or (precision == "auto" and has_int8)
        return load_onnx_ensemble(ens_dir, method=method, precision="int8" if int8 else "fp32")
    if engine == "auto" and on_cpu:
        if has_int8 and precision == "auto":
            return load_onnx_ensemble(ens_dir, method=method, precision="int8")
        bf16 = precision == "bf16" or (precision == "auto" and cpu_has_native_bf16())
        if has_fp32 and not bf16:
            return load_onnx_ensemble(ens_dir, method=method)
    return load_ensemble(ens_dir, method=method, device=device, precision=precision)
