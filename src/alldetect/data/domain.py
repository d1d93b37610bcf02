"""The domain check: is a cell like the cells the model learnt from? A guard, not a guarantee.

A ``DomainReference`` holds what the training cells look like (``cell_measures`` of their center crops, not
of the model's resized input): how black the border around the cell is, the cell's diameter,
its colours, and all measures together (a Mahalanobis distance). Thresholds are fitted on the training
donors' cells, each scored against a reference fitted without its donor, so that about ``TARGET_FLAGGED`` of
them would be flagged. A cell that fails a check is out of domain, with a note naming what failed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from sklearn.covariance import LedoitWolf
from tqdm import tqdm

from ..errors import ImageProblem
from .cell_measures import HAND_FEATURES, MEASURES, SHAPE_AND_STAIN, cell_measures
from .images import read_rgb
from .geometry import center_crop

DOMAIN_VERSION = 1
TARGET_FLAGGED = 0.02       # share of the training donors' own cells (out of fold) the checks flag together
SPECIFIC_LEVEL = 0.0025     # ... of which each specific check (border, size, colour) flags at most this share
NO_CELL_DIAMETER = 0.02     # a foreground narrower than this share of the side: no cell in the frame
MOST_BLACK_BORDER_NEEDED = 0.5  # a segmented cell touching its frame's border still leaves most of it black
COLOUR = ("mean_r", "mean_g", "mean_b", "intensity_std", "hue_spread")
FEATURES = (*HAND_FEATURES, *SHAPE_AND_STAIN)  # every measure but the border, which has a check of its own
_DONOR_FOLDS = 5


@dataclass(frozen=True)
class Gaussian:
    """Mean, scale and (Ledoit-Wolf shrunk) precision of some standardised measures: the Mahalanobis distance of
    a cell to the training cells."""
    columns: tuple[str, ...]
    mean: tuple[float, ...]
    scale: tuple[float, ...]
    precision: tuple[tuple[float, ...], ...]

    @classmethod
    def fit(cls, measures: np.ndarray, columns: tuple[str, ...]) -> Gaussian:
        x = measures[:, [MEASURES.index(c) for c in columns]]
        mean, scale = x.mean(axis=0), np.maximum(x.std(axis=0), 1e-6)
        precision = LedoitWolf().fit((x - mean) / scale).precision_
        return cls(columns, tuple(map(float, mean)), tuple(map(float, scale)), tuple(map(tuple, precision.tolist())))

    def distance(self, measures: np.ndarray) -> np.ndarray:
        x = (measures[:, [MEASURES.index(c) for c in self.columns]] - np.asarray(self.mean)) / np.asarray(self.scale)
        return np.sqrt(np.einsum("ij,jk,ik->i", x, np.asarray(self.precision), x).clip(0))


@dataclass(frozen=True)
class DomainVerdict:
    in_domain: np.ndarray   # (N,) bool
    notes: list[str]        # "" for a cell in domain, else what failed, e.g. "cell is 2.1x larger than ..."


@dataclass(frozen=True)
class DomainReference:
    side: int                  # the side of the center crops the measures were taken on
    diameter: float            # median cell diameter of the training cells, as a share of the side
    min_black_border: float    # less of the border black than this: the cell does not look segmented
    size_ratio: tuple[float, float]  # smallest and largest diameter / median seen in the training cells
    colour: Gaussian
    colour_limit: float
    features: Gaussian
    features_limit: float
    fitted_on: str             # e.g. "1334 cells of 14 donors"
    flagged_out_of_fold: float  # share of the training donors' cells flagged, each scored by a reference without it

    def check(self, measures: np.ndarray) -> DomainVerdict:
        """The verdict on cells' ``cell_measures`` (of crops of ``side`` pixels)."""
        scores = _scores(measures, {"diameter": self.diameter, "colour": self.colour, "features": self.features})
        limits = {"border": self.min_black_border, "size": self.size_ratio, "colour": self.colour_limit,
                  "features": self.features_limit}
        failed = _failures(scores, limits, measures[:, MEASURES.index("diameter")])
        ratio = scores[:, 1]
        notes = []
        for i in range(len(measures)):
            reasons = [(_size_note(ratio[i]) if reason == "size" else reason)
                       for reason, mask in failed.items() if mask[i]]
            notes.append("; ".join(reasons))
        return DomainVerdict(np.array([not n for n in notes], bool), notes)

    def to_json(self) -> dict:
        return {"version": DOMAIN_VERSION, "measures": list(MEASURES), **asdict(self)}

    @classmethod
    def from_json(cls, raw: dict) -> DomainReference:
        """Raises ``ValueError`` or ``KeyError`` naming what is wrong."""
        if raw.get("version") != DOMAIN_VERSION or raw.get("measures") != list(MEASURES):
            raise ValueError(f"domain reference version {raw.get('version')!r} with measures {raw.get('measures')}: "
                             f"this alldetect reads version {DOMAIN_VERSION}; rebuild the ensemble")
        fields = {k: v for k, v in raw.items() if k not in ("version", "measures")}
        for name in ("colour", "features"):
            g = fields[name]
            fields[name] = Gaussian(tuple(g["columns"]), tuple(g["mean"]), tuple(g["scale"]),
                                    tuple(map(tuple, g["precision"])))
        fields["size_ratio"] = tuple(fields["size_ratio"])
        reference = cls(**fields)
        numbers = [reference.diameter, reference.min_black_border, *reference.size_ratio, reference.colour_limit,
                   reference.features_limit]
        if not all(isinstance(v, (int, float)) and np.isfinite(v) for v in numbers):
            raise ValueError("a threshold is not a finite number")
        return reference


def _size_note(ratio: float) -> str:
    return (f"cell is {ratio:.1f}x larger than training cells" if ratio >= 1
            else f"cell is {1 / ratio:.1f}x smaller than training cells")


def measure_images(paths: Sequence[str], crop: int) -> tuple[np.ndarray, list[int], list[ImageProblem]]:
    """``cell_measures`` of the ``crop`` px center crops of the images at ``paths``, one image in memory at a
    time: the measures of those that could be read, their indices, and the problems of the others."""
    measures, readable, problems = [], [], []
    for i, path in enumerate(tqdm(paths, desc="measuring cells", unit="cell", leave=False, disable=None)):
        try:
            measures.append(cell_measures(center_crop(read_rgb(path)[0], crop, path=path)[None])[0])
        except ImageProblem as e:
            problems.append(e)
            continue
        readable.append(i)
    return (np.stack(measures) if measures else np.zeros((0, len(MEASURES)))), readable, problems


def fit_domain(measures: np.ndarray, donors: list[str], side: int, *,
               target: float = TARGET_FLAGGED) -> DomainReference:
    """The reference of training cells' ``measures`` (of crops of ``side`` pixels). Each cell is scored against
    a reference fitted without its donor (donors dealt into up to five folds); the specific checks (border,
    size, colour) each flag ``SPECIFIC_LEVEL`` of those cells, and the catch-all feature distance takes the rest
    of the ``target`` share, the measured one being ``flagged_out_of_fold``."""
    unique = sorted(set(donors))
    fold_of = {d: i % _DONOR_FOLDS for i, d in enumerate(unique)}
    folds = np.array([fold_of[d] for d in donors])
    if len(unique) > 1:
        scores = np.zeros((len(measures), 4))
        for k in sorted(set(folds)):
            held = folds == k
            scores[held] = _scores(measures[held], _centre(measures[~held]))
    else:
        scores = _scores(measures, _centre(measures))
    diameter = measures[:, MEASURES.index("diameter")]
    low, high = 0.0, target
    for _ in range(30):  # bisection on the feature check's share
        level = (low + high) / 2
        share = _flagged(scores, _limits(scores, level), diameter).mean()
        low, high = (level, high) if share < target else (low, level)
    limits = _limits(scores, low)
    centre = _centre(measures)
    return DomainReference(
        side=side, diameter=centre["diameter"], min_black_border=limits["border"], size_ratio=limits["size"],
        colour=centre["colour"], colour_limit=limits["colour"], features=centre["features"],
        features_limit=limits["features"], fitted_on=f"{len(measures)} cells of {len(unique)} donors",
        flagged_out_of_fold=float(_flagged(scores, limits, diameter).mean()))


def _centre(measures: np.ndarray) -> dict:
    return {"diameter": float(np.median(measures[:, MEASURES.index("diameter")])),
            "colour": Gaussian.fit(measures, COLOUR), "features": Gaussian.fit(measures, FEATURES)}


def _scores(measures: np.ndarray, centre: dict) -> np.ndarray:
    """Per cell: black border, diameter / median, colour distance, feature distance."""
    ratio = np.maximum(measures[:, MEASURES.index("diameter")], 1e-6) / centre["diameter"]
    return np.stack([measures[:, MEASURES.index("black_border")], ratio, centre["colour"].distance(measures),
                     centre["features"].distance(measures)], axis=1)


def _limits(scores: np.ndarray, features_level: float) -> dict:
    border, ratio, colour, features = scores.T
    return {"border": min(float(np.quantile(border, SPECIFIC_LEVEL)), MOST_BLACK_BORDER_NEEDED),
            "size": (float(np.quantile(ratio, SPECIFIC_LEVEL / 2)), float(np.quantile(ratio, 1 - SPECIFIC_LEVEL / 2))),
            "colour": float(np.quantile(colour, 1 - SPECIFIC_LEVEL)),
            "features": float(np.quantile(features, 1 - features_level))}


def _failures(scores: np.ndarray, limits: dict, diameter: np.ndarray) -> dict[str, np.ndarray]:
    """Each check's verdict per cell (True: failed), named as the note says it; a frame without a cell fails
    only the first."""
    border, ratio, colour, features = scores.T
    no_cell = diameter < NO_CELL_DIAMETER
    return {"no cell: the frame is (nearly) empty": no_cell,
            "background is not black: the cell does not look segmented": border < limits["border"],
            "size": ~no_cell & ((ratio < limits["size"][0]) | (ratio > limits["size"][1])),
            "colours far from the training stain": ~no_cell & (colour > limits["colour"]),
            "features far from every training cell": ~no_cell & (features > limits["features"])}


def _flagged(scores: np.ndarray, limits: dict, diameter: np.ndarray) -> np.ndarray:
    return np.logical_or.reduce(list(_failures(scores, limits, diameter).values()))
