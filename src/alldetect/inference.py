"""Score images with a member: batched, no gradients, on any device."""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from torch import nn


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        from .errors import AlldetectError

        raise AlldetectError(f"device {device!r} requested but CUDA is not available; use --device cpu")
    return torch.device(device)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA for ``precision`` "bf16" or "auto"; fp32 otherwise."""
    if device.type == "cuda" and precision in ("bf16", "auto"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
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
