"""One member's run folder, the bookkeeping ``fit`` leaves to it:

    config.json                  the config, seed and library versions
    history.csv                  step, epoch, lr, loss
    epochs.csv                   validation loss and metrics per epoch, which epoch was selected, images/s
    problems.csv                 images that could not be read
    checkpoints/last.pt          everything a resume needs; checkpoints/best.pt the selected epoch's weights
    predictions_{val,test}.csv, metrics.json   the selected epoch's scores

Only the main process of a distributed run writes.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import versions
from ..formats.csvfiles import append_csv, write_csv_atomic
from ..formats.predictions import write_predictions
from ..formats.problems import Problem, write_problems
from .checkpoint import load_checkpoint, rng_state, save_checkpoint
from .config import TrainConfig

HISTORY_COLUMNS = ("step", "epoch", "lr", "loss")


@dataclass
class Best:
    """The selected epoch so far and its selection score (higher is better)."""
    epoch: int = -1
    score: float = -math.inf


@dataclass
class StepRecord:
    step: int
    epoch: int
    lr: float
    loss: torch.Tensor  # on the device: read back only when written, so steps never wait for it


class RunDir:
    """A run folder: ``fit`` writes it (only the main process of a distributed run); the ensemble reads it."""
    CONFIG = "config.json"
    HISTORY = "history.csv"
    EPOCHS = "epochs.csv"
    METRICS = "metrics.json"
    PROBLEMS = "problems.csv"
    RECORDS = (CONFIG, HISTORY, EPOCHS, METRICS)  # what an ensemble folder keeps of each member's training

    def __init__(self, path: str | Path, *, writes: bool = True):
        self.path = Path(path)
        self.writes = writes
        self.last = self.path / "checkpoints" / "last.pt"
        self.best = self.path / "checkpoints" / "best.pt"

    @property
    def finished(self) -> bool:
        return self.best.is_file() and (self.path / self.METRICS).is_file()

    def config(self) -> dict:
        """The run's training config, as ``config.json`` recorded it."""
        return json.loads((self.path / self.CONFIG).read_text())["config"]

    def metrics(self) -> dict:
        return json.loads((self.path / self.METRICS).read_text())

    def best_state(self) -> dict:
        """The selected epoch's checkpoint (weights, member, config, epoch)."""
        return load_checkpoint(self.best)

    def predictions(self, split: str) -> Path:
        return self.path / f"predictions_{split}.csv"

    def resume_state(self) -> dict | None:
        """The last checkpoint, or None when there is none."""
        return load_checkpoint(self.last) if self.last.is_file() else None

    def start(self, cfg: TrainConfig, step: int, *, fresh: bool, problems: list[Problem]) -> None:
        """A fresh run forgets earlier records; a resumed one drops the rows written after its checkpoint."""
        if not self.writes:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        if fresh:
            for name in (self.HISTORY, self.EPOCHS, self.METRICS):
                (self.path / name).unlink(missing_ok=True)
        else:
            _truncate_csv(self.path / self.HISTORY, lambda r: int(r["step"]) < step)
            _truncate_csv(self.path / self.EPOCHS, lambda r: int(r["step"]) <= step)
        (self.path / self.CONFIG).write_text(json.dumps({"config": asdict(cfg), "seed": cfg.seed,
                                                         "versions": versions()}, indent=2))
        write_problems(problems, self.path / self.PROBLEMS)

    def log_epoch(self, columns: tuple[str, ...], record: dict) -> None:
        if self.writes:
            append_csv(self.path / self.EPOCHS, columns, [record])

    def save_best(self, model: nn.Module, cfg: TrainConfig, epoch: int, step: int) -> None:
        if self.writes:
            save_checkpoint({"member": cfg.member, "model": model.state_dict(), "config": asdict(cfg),
                             "epoch": epoch, "step": step}, self.best)

    def save_last(self, model: nn.Module, optimizer: torch.optim.Optimizer, cfg: TrainConfig, step: int,
                  best: Best, pending: list[StepRecord], *, ema: nn.Module | None = None) -> None:
        """Write the pending history rows, then ``last.pt`` (with the weights' moving average ``ema`` when there
        is one): the history never runs ahead of the checkpoint by more than the steps a resume will redo (and
        those rows are dropped on resume)."""
        if self.writes:
            losses = torch.stack([r.loss for r in pending]).float().cpu().tolist() if pending else []  # syncs
            append_csv(self.path / self.HISTORY, HISTORY_COLUMNS,
                        [{"step": r.step, "epoch": r.epoch, "lr": f"{r.lr:.10g}", "loss": f"{loss:.6f}"}
                         for r, loss in zip(pending, losses)])
            state = {"member": cfg.member, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "step": step, "best": asdict(best), "config": asdict(cfg), "rng": rng_state()}
            if ema is not None:
                state["ema"] = ema.state_dict()
            save_checkpoint(state, self.last)
        pending.clear()

    def write_scores(self, split: str, rows: list, prob: np.ndarray, member: str) -> None:
        write_predictions(self.predictions(split), [r.path for r in rows], [r.label for r in rows],
                          prob, model=member, subjects=[r.subject for r in rows])

    def write_metrics(self, metrics: dict) -> None:
        (self.path / self.METRICS).write_text(json.dumps(metrics, indent=2))


def _truncate_csv(path: Path, keep: Callable[[dict], bool]) -> None:
    if not path.is_file():
        return
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        columns, rows = reader.fieldnames, [r for r in reader if keep(r)]
    write_csv_atomic(path, columns, rows)
