"""Numeric precision, in one place: the choices, the autocast rule of training and of scoring, and how far a
reduced precision may move a member's P(ALL) before that member keeps fp32."""

from __future__ import annotations

import contextlib
from enum import Enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where it runs: the CLI reads the choices without it
    import torch


class Precision(str, Enum):
    auto = "auto"  # training: bf16 on CUDA, fp32 on CPU; scoring: the fastest accurate engine (inference.load)
    fp32 = "fp32"
    bf16 = "bf16"
    int8 = "int8"  # scoring only: the exported, calibrated ONNX graph


TRAINING_PRECISIONS = (Precision.auto.value, Precision.bf16.value, Precision.fp32.value)
BF16_TOLERANCE = 0.05  # largest mean change of a member's P(ALL), bf16 against fp32, on validation cells
INT8_TOLERANCE = 0.05  # largest mean change of a member's P(ALL), int8 against fp32, on the calibration cells


def training_autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Training and validation: bf16 autocast on CUDA for ``precision`` "bf16" or "auto", on CPU only for
    "bf16" (opt-in: CPU training defaults to fp32); fp32 otherwise."""
    import torch

    if device.type == "cuda" and precision in ("bf16", "auto"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if device.type == "cpu" and precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def inference_autocast(device: torch.device, precision: str = "auto") -> contextlib.AbstractContextManager:
    """Scoring: bf16 on CUDA, and on CPUs with native bf16 (2-3x faster here, same AUC: BENCHMARKS.md);
    fp32 elsewhere or when ``precision`` is "fp32"."""
    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if device.type == "cpu" and (precision == "bf16" or cpu_has_native_bf16()):
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bf16 natively here (AVX-512 BF16 or AMX); emulated bf16 would be slower."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False
