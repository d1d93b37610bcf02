"""Checkpoints are plain dicts of tensors and numbers, written atomically and loaded with
``weights_only=True``: a file crafted to run code when unpickled is refused, never executed."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch

from ..errors import AlldetectError, first_line

FORMAT = "alldetect-checkpoint"


class CheckpointError(AlldetectError):
    """A checkpoint is missing, unsafe, or does not match the installed code."""


def save_checkpoint(state: dict, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save({"format": FORMAT, **state}, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path) -> dict:
    """Load safely; errors say what is wrong with the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: refused: the file holds Python objects that could run code when "
                              f"loaded, not just weights ({first_line(e)})") from None
    except Exception as e:  # torch.load fails on damaged files with many types (RuntimeError, struct.error, ...)
        raise CheckpointError(f"{path}: not a readable checkpoint ({first_line(e)})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an alldetect checkpoint")
    return state


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
