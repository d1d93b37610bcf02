"""Running members: the device, the precision (autocast) and batched scoring without gradients."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import numpy as np
import torch
from torch import nn

from ..data.transforms import dihedral_views
from ..errors import AlldetectError
from ._registry import Member
from ..precision import inference_autocast, training_autocast


def resolve_device(device: str = "auto") -> torch.device:
    """The torch device for "auto", "cpu" or "cuda[:N]"."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise AlldetectError(f"device {device!r} requested but CUDA is not available; use --device cpu")
    return torch.device(device)


def predict_probs(model: nn.Module, images: np.ndarray, positions: np.ndarray | None = None, *,
                  batch_size: int = 64, device: torch.device | None = None, precision: str = "auto") -> np.ndarray:
    """P(ALL) of one member during training, for ``images[positions]`` (uint8 NHWC), as float64, with the
    training autocast rule."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        return score_members([model], images, positions, device=device, precision=precision,
                             batch_size=batch_size, autocast=training_autocast)[0]
    finally:
        model.train(was_training)


@torch.inference_mode()
def score_members(members: list[Member], crops: np.ndarray, positions: np.ndarray | None = None, *,
                  device: torch.device, precision: str = "auto", fp32_members: frozenset[str] = frozenset(),
                  tta: bool = False, batch_size: int = 32,
                  autocast: Callable[[torch.device, str], AbstractContextManager] = inference_autocast) -> np.ndarray:
    """(members, N) P(ALL) for uint8 crops (N, S, S, 3) (or ``crops[positions]``, read a batch at a time), with
    the ``autocast`` rule (default: scoring's); members named in ``fp32_members`` always run in fp32. With ``tta``
    each member's probability is the mean over the eight flips and 90-degree rotations of the cell (cells have no
    orientation). The probabilities stay on the device until the last batch is scored: on a GPU the host prepares
    the next batch while the device scores this one, and copies go from pinned memory."""
    count = len(crops) if positions is None else len(positions)
    out = torch.zeros((len(members), count), device=device)
    for start in range(0, count, batch_size):
        rows = slice(start, start + batch_size) if positions is None else \
            np.asarray(positions[start:start + batch_size])
        batch = np.ascontiguousarray(crops[rows])
        if not batch.flags.writeable:  # a slice of the read-only crop cache: torch wants memory it may write
            batch = batch.copy()
        x = torch.from_numpy(batch)
        if device.type == "cuda":
            x = x.pin_memory()
        x = x.to(device, non_blocking=True).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
        views = dihedral_views(x) if tta else [x]
        for k, member in enumerate(members):
            member_precision = "fp32" if fp32_members and member.name in fp32_members else precision
            with autocast(device, member_precision):
                probs = [member(v).float().softmax(1)[:, 1] for v in views]
            out[k, start:start + len(x)] = torch.stack(probs).mean(0)
    return out.cpu().double().numpy()
