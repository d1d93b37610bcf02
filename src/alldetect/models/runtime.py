"""Running members: the device, the precision (autocast) and batched scoring without gradients."""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from torch import nn

from ..data.transforms import dihedral_views
from ..errors import AlldetectError
from ._registry import Member


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise AlldetectError(f"device {device!r} requested but CUDA is not available; use --device cpu")
    return torch.device(device)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Training and validation: bf16 autocast on CUDA for ``precision`` "bf16" or "auto", on CPU only for
    "bf16" (opt-in: CPU training defaults to fp32); fp32 otherwise."""
    if device.type == "cuda" and precision in ("bf16", "auto"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if device.type == "cpu" and precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bf16 natively here (AVX-512 BF16 or AMX); emulated bf16 would be slower."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def inference_autocast(device: torch.device, precision: str = "auto") -> contextlib.AbstractContextManager:
    """Scoring: bf16 on CUDA, and on CPUs with native bf16 (2-3x faster here, same AUC: BENCHMARKS.md);
    fp32 elsewhere or when ``precision`` is "fp32"."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if device.type == "cpu" and (precision == "bf16" or cpu_has_native_bf16()):
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.inference_mode()
def predict_probs(model: nn.Module, images: np.ndarray, positions: np.ndarray | None = None, *,
                  batch_size: int = 64, device: torch.device | None = None, precision: str = "auto",
                  channels_last: bool = True) -> np.ndarray:
    """P(ALL) for ``images[positions]`` (uint8 NHWC), as float64."""
    device = device or next(model.parameters()).device
    positions = np.arange(len(images)) if positions is None else np.asarray(positions)
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(positions), batch_size):
        batch = torch.from_numpy(np.ascontiguousarray(images[positions[start:start + batch_size]]))
        x = batch.permute(0, 3, 1, 2).to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, precision):
            logits = model(x)
        out.append(logits.float().softmax(dim=1)[:, 1].cpu())
    model.train(was_training)
    return torch.cat(out).double().numpy() if out else np.zeros(0)


@torch.inference_mode()
def score_members(members: list[Member], crops: np.ndarray, *, device: torch.device, precision: str = "auto",
                  fp32_members: frozenset[str] = frozenset(), tta: bool = False, batch_size: int = 32) -> np.ndarray:
    """(members, N) P(ALL) for uint8 crops (N, S, S, 3), with ``inference_autocast``; members named in
    ``fp32_members`` always run in fp32. With ``tta`` each member's probability is the mean over the eight
    flips and 90-degree rotations of the cell (cells have no orientation)."""
    out = np.zeros((len(members), len(crops)))
    for start in range(0, len(crops), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(crops[start:start + batch_size])).permute(0, 3, 1, 2)
        x = x.to(device).contiguous(memory_format=torch.channels_last)
        views = dihedral_views(x) if tta else [x]
        for k, member in enumerate(members):
            member_precision = "fp32" if member.name in fp32_members else precision
            with inference_autocast(device, member_precision):
                probs = [member(v).float().softmax(1)[:, 1] for v in views]
            out[k, start:start + len(x)] = torch.stack(probs).mean(0).double().cpu().numpy()
    return out
