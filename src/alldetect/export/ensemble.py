"""Export an ensemble folder: its fp32 ONNX graph and the int8 copy calibrated on validation cells."""

from __future__ import annotations

from pathlib import Path

from ..inference.onnx_engine import ONNX_NAME
from .graph import export_onnx
from .quantize import TOLERANCE


def export_ensemble(ens_dir: str | Path, *, out: str | Path | None = None, method: str | None = None,
                    input_dtype: str = "uint8", int8: bool = True, calibration: list[Path] | None = None,
                    calibration_cells: int = 128, int8_tolerance: float = TOLERANCE) -> dict:
    """Write the fp32 graph (default ``ENS_DIR/ensemble.onnx``) and, with ``int8``, its static int8 copy
    calibrated on validation cells; returns ``{"fp32": path, "int8": quantize_ensemble's summary or None}``."""
    from ..inference.torch_engine import load_ensemble
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
