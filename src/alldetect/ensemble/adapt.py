"""Adapting an ensemble to a site's imaging batch without labels: the settings, and the rules on which cells it
may be done (the re-estimation itself: ``models.batchnorm``).

A site's cells are one imaging batch of many donors, both kinds as they come: the statistics of one donor's
cells would erase the very difference the ensemble must call, and those of a batch of one class shift every cell
toward the other (label shift; BENCHMARKS.md measures it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..choices import AdaptLayers
from ..errors import AlldetectError

MIN_CELLS = 20             # fewest cells to adapt on (the default of --min-cells)
MOST_OUTSIDE = 0.5         # refused when more than this share of the cells is outside the training domain
SHARE_CELLS = 256          # cells scored (without TTA) before and after adapting, to see how far the calls moved
SHARE_SHIFT = 0.25         # a move of the share called ALL beyond this is warned of (label shift)


@dataclass(frozen=True)
class AdaptSettings:
    layers: str = AdaptLayers.all.value  # AdaptLayers: every BatchNorm layer, or the early ones
    site_weight: float = 1.0             # 1: the site's statistics; 0.5: halfway from the training ones
    min_cells: int = MIN_CELLS           # fewest usable cells

    def __post_init__(self) -> None:
        AdaptLayers.checked(self.layers, "layers")
        if not (isinstance(self.site_weight, (int, float)) and 0 < self.site_weight <= 1):
            raise AlldetectError(f"site weight must be in (0, 1], got {self.site_weight!r}")
        if not isinstance(self.min_cells, int) or isinstance(self.min_cells, bool) or self.min_cells < 2:
            raise AlldetectError(f"min cells must be a whole number of at least 2, got {self.min_cells!r}")


def check_site_cells(cells: int, subjects: Sequence[str], outside: int | None, settings: AdaptSettings) -> None:
    """Refuse, in one line, cells that adapting would harm: fewer than ``settings.min_cells``; all of one donor
    (when ``subjects`` name donors); mostly outside the training domain (``outside`` of ``cells``)."""
    if cells < settings.min_cells:
        raise AlldetectError(f"{cells} usable cell(s): adapting needs at least {settings.min_cells} cells of the "
                             "site's batch (--min-cells), many donors, both kinds as they come")
    donors = {s for s in subjects if s}
    if len(donors) == 1 and all(subjects):
        raise AlldetectError(f"every cell is of one donor ({next(iter(donors))}): adapting on one donor's cells "
                             "erases the difference the ensemble must call; adapt on cells of many donors")
    if outside is not None and outside > MOST_OUTSIDE * cells:
        raise AlldetectError(f"{outside} of {cells} cells are unlike the cells this ensemble was trained on (the "
                             "domain check): this is not a batch of C-NMC-like single-cell images it can adapt to")

