"""Which engine scores an ensemble folder: the fastest accurate one the folder and the machine allow."""

from __future__ import annotations

from pathlib import Path

from .. import choices
from ..ensemble.folder import EnsembleFolder
from ..errors import AlldetectError, has_extra
from ..precision import Precision, cpu_has_native_bf16
from ..models.runtime import resolve_device
from .engine import Engine
from .onnx_engine import OnnxEngine
from .torch_engine import TorchEngine


def load_engine(folder: EnsembleFolder | str | Path, *, method: str | None = None, device: str = "auto",
                engine: str = "auto", precision: str = "auto") -> Engine:
    """``torch``, ``onnx`` (onnxruntime), ``prefer-onnx`` (the exported graph when there is one, else auto), or
    ``auto``, the fastest accurate engine measured (BENCHMARKS.md):
    on a CPU the exported int8 graph, else torch in bf16 where the CPU has native bf16, else the exported
    fp32 graph, else torch in fp32; on a GPU torch in bf16. ``precision`` narrows the choice (auto, fp32,
    bf16 on torch, int8 on onnx)."""
    engine = choices.Engine.checked(engine, "engine")
    if precision not in {p.value for p in Precision}:
        raise AlldetectError(f"precision must be auto, fp32, bf16 or int8, not {precision!r}")
    folder = EnsembleFolder.of(folder)
    if engine == choices.Engine.prefer_onnx:
        engine = "onnx" if has_extra("onnx") and folder.graph().is_file() else "auto"
    if (engine, precision) in (("torch", "int8"), ("onnx", "bf16")):
        raise AlldetectError(f"precision {precision} runs on the {'onnx' if precision == 'int8' else 'torch'} "
                             f"engine, not {engine}")
    on_cpu = resolve_device(device).type == "cpu"
    runs_graphs = has_extra("onnx")  # without it, the torch engine scores what the graphs would
    has_int8 = runs_graphs and folder.graph(int8=True).is_file()
    has_fp32 = runs_graphs and folder.graph().is_file()
    if engine == "onnx" or precision == "int8":
        int8 = precision == "int8" or (precision == "auto" and has_int8)
        return OnnxEngine.from_folder(folder, method=method, precision="int8" if int8 else "fp32")
    if engine == "auto" and on_cpu:
        if has_int8 and precision == "auto":
            return OnnxEngine.from_folder(folder, method=method, precision="int8")
        bf16 = precision == "bf16" or (precision == "auto" and cpu_has_native_bf16())
        if has_fp32 and not bf16:
            return OnnxEngine.from_folder(folder, method=method)
    return TorchEngine.from_folder(folder, method=method, device=device, precision=precision)
