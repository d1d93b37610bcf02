"""The problems report: every file that was skipped or converted, and why. Nothing is lost silently."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from .csvfiles import printable, write_csv_atomic

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Problem:
    path: str
    problem: str
    action: str  # "skipped" (not in the output) or "converted" (kept after a fix)


def write_problems(problems: list[Problem], path: str | Path) -> None:
    write_csv_atomic(path, ("path", "problem", "action"), [{**asdict(p), "path": printable(p.path)} for p in problems])


def log_problems(problems: list[Problem], *, shown: int = 10) -> None:
    """Log the first few problems one per line and a count of the rest."""
    for p in problems[:shown]:
        logger.warning("%s: %s (%s)", printable(p.path), p.problem, p.action)
    if len(problems) > shown:
        logger.warning("... and %d more problem(s)", len(problems) - shown)
