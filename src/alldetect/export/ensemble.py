"""Export an ensemble folder: its fp32 ONNX graph and the int8 copy calibrated on validation cells."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..ensemble.folder import EnsembleFolder
from ..inference.torch_engine import TorchEngine
from ..precision import INT8_TOLERANCE
from .graph import export_onnx
from .quantize import Int8Summary, calibration_crops, quantize_ensemble


@dataclass
class Exported:
    fp32: Path
    int8: Int8Summary | None  # None: not asked for, or int8 moved every member beyond the tolerance

    def describe_int8(self) -> str:
        if self.int8 is None:
            return "no int8 graph written: int8 moved every member's P(ALL) beyond the tolerance"
        return self.int8.describe()


def export_ensemble(folder: EnsembleFolder | str | Path, *, out: str | Path | None = None, method: str | None = None,
                    input_dtype: str = "uint8", int8: bool = True, calibration: list[Path] | None = None,
                    calibration_cells: int = 128, int8_tolerance: float = INT8_TOLERANCE) -> Exported:
    """Write the fp32 graph (default the folder's ``ensemble.onnx``) and, with ``int8``, its static int8 copy
    calibrated on validation cells (see ``quantize_ensemble``)."""
    folder = EnsembleFolder.of(folder)
    model = TorchEngine.from_folder(folder, method=method, device="cpu")
    if int8:  # before the export, so that missing calibration cells fail at once
        crops, labels, source = calibration_crops(folder, model, calibration=calibration, cells=calibration_cells)
    path = Path(out) if out else folder.graph()
    folder.record_graph(path, written=False)
    export_onnx(model, path, input_dtype=input_dtype)
    folder.record_graph(path, written=True)
    if not int8:
        return Exported(path, None)
    return Exported(path, quantize_ensemble(folder, path, model, crops, labels, source=source,
                                            input_dtype=input_dtype, tolerance=int8_tolerance))
