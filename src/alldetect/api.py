"""alldetect as a library: an ensemble folder to cell and patient calls in three lines, and the commands that
train one.

>>> import alldetect                                          # doctest: +SKIP
>>> ensemble = alldetect.load("runs/demo/ensemble")           # doctest: +SKIP
>>> cells = ensemble.predict(["a.bmp", "b.png"])              # doctest: +SKIP
>>> cells.patients().to_pandas()                              # doctest: +SKIP

Everything goes through the code the commands use (``load_engine``, ``score_table``, ``run_pipeline``,
``fit``): the same engine choice, operating point, domain check and test-time augmentation default.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from .data.images import image_rgb, read_rgb
from .ensemble.folder import EnsembleFolder
from .errors import AlldetectError
from .formats.manifest import ManifestRow
from .formats.operating_point import OperatingPoint
from .inference.engine import Engine
from .inference.load import load_engine
from .inference.predict import collect_inputs, score_table
from .inference.table import CellTable

Image = Any  # a path (str or Path) to a file or folder, an (H, W[, 3 or 4]) array, or a PIL image


@dataclass
class Ensemble:
    """An ensemble folder ready to score cells (see ``load``).

    Attributes
    ----------
    folder : EnsembleFolder
        The folder: the spec, member weights, graphs and model card.
    engine : Engine
        What scores: torch (any device) or onnxruntime (the exported graphs).
    """
    folder: EnsembleFolder
    engine: Engine

    @property
    def members(self) -> list[str]:
        """The member networks, in the order of the ``prob_<member>`` columns."""
        return list(self.engine.names)

    @property
    def method(self) -> str:
        """The combiner that gives ``prob_all``."""
        return self.engine.method

    @property
    def operating_point(self) -> OperatingPoint:
        """The thresholds of the cell and patient calls, as fitted when the ensemble was built."""
        return self.engine.operating_point

    def predict(self, images: Image | Iterable[Image], *, subjects: list[str] | None = None,
                labels: list[str] | None = None, tta: bool | None = None, domain_check: bool = True) -> CellTable:
        """Score cell images.

        Parameters
        ----------
        images : path, array, PIL image, or a list of them
            Files and folders as ``alldetect predict`` takes them (folders are searched, C-NMC trees included),
            or decoded images: (H, W, 3) uint8 RGB arrays (grey, 16-bit, float and RGBA arrays are converted as
            files are) or PIL images. Frames are center-cropped like the training cells.
        subjects : list of str, optional
            The patient of each image, for ``patients()``; by default parsed from C-NMC file names.
        labels : list of str, optional
            The truth of each image (``all``, ``hem`` or ``""``); by default parsed from C-NMC file names.
        tta : bool, optional
            Test-time augmentation; by default as the ensemble was fitted.
        domain_check : bool
            Check every cell against the ensemble's training cells; a cell unlike them is called OUTSIDE.

        Returns
        -------
        CellTable
            One row per image, with the columns of the predictions CSV and ``call`` (ALL, HEM or OUTSIDE);
            unreadable images have an ``error`` and no probability. ``.patients()`` gives the patient calls,
            ``.to_pandas()`` a DataFrame, ``.to_csv(path)`` the file ``predict`` writes.
        """
        items = [images] if isinstance(images, (str, Path, np.ndarray)) or _is_pil(images) else list(images)
        rows, decoders = [], []
        for i, item in enumerate(items):
            if isinstance(item, (str, Path)):
                found = collect_inputs([item]) if Path(item).is_dir() else None
                for row in (found.rows if found else [_file_row(Path(item))]):
                    rows.append(row)
                    reason = found.errors.get(row.path) if found else None
                    decoders.append(reason or functools.partial(read_rgb, row.path))
            else:
                name = f"image {i}"
                rows.append(ManifestRow(path=name))
                decoders.append(functools.partial(image_rgb, item, name=name))
        for values, field in ((subjects, "subject"), (labels, "label")):
            if values is not None:
                if len(values) != len(rows):
                    raise AlldetectError(f"{len(values)} {field}s for {len(rows)} images")
                rows = [_with(r, field, v) for r, v in zip(rows, values)]
        return score_table(self.engine, rows, {}, tta=tta, domain_check=domain_check, decoders=decoders)


def load(folder: str | Path, *, engine: str = "auto", method: str | None = None, device: str = "auto",
         precision: str = "auto") -> Ensemble:
    """Load an ensemble folder (what ``alldetect ensemble`` or ``run`` wrote) for scoring.

    Parameters
    ----------
    folder : str or Path
        The ensemble folder.
    engine : {"auto", "torch", "onnx"}
        auto: the fastest accurate engine the folder and the machine allow (as ``alldetect predict``).
    method : str, optional
        The combiner (default: the folder's).
    device : str
        "auto", "cpu" or "cuda[:N]".
    precision : {"auto", "fp32", "bf16", "int8"}
        Narrows the engine's choice.

    Returns
    -------
    Ensemble
    """
    ensemble_folder = EnsembleFolder(folder)
    return Ensemble(ensemble_folder, load_engine(ensemble_folder, method=method, device=device, engine=engine,
                                                 precision=precision))


def train(manifest: str | Path, *, member: str = "densenet121", profile: str = "paper", out: str | Path | None = None,
          resume: bool = False, **options: Any) -> Path:
    """Fine-tune one member on a split manifest, as ``alldetect train`` does.

    Parameters
    ----------
    manifest : str or Path
        A manifest CSV with train and val splits (``alldetect index`` then ``split``).
    member : str
        The network (``alldetect members`` lists them).
    profile : {"paper", "plus", "demo"}
        The set of defaults.
    out : str or Path, optional
        The run folder (default: ``runs/<member>``).
    resume : bool
        Continue from the run folder's last checkpoint.
    **options
        Any ``TrainConfig`` field (epochs, batch_size, crop, input_size, device, seed, ...).

    Returns
    -------
    Path
        The run folder.
    """
    from .training import fit, profile_config

    cfg = profile_config(profile, member=member, manifest=str(manifest), out=str(out or Path("runs") / member),
                         **options)
    return fit(cfg, resume=resume)


def run(*, data: str | Path | None = None, out: str | Path = "runs/demo", profile: str | None = None,
        members: Iterable[str] | None = None, **options: Any) -> Path:
    """The whole method, as ``alldetect run`` does: index, split (or cross-fit), train every member, build the
    ensemble, report. Finished stages are reused; an interrupted member resumes.

    Parameters
    ----------
    data : str or Path, optional
        A C-NMC tree or a folder of labelled cells (default: the built-in synthetic cells).
    out : str or Path
        The output folder.
    profile : {"paper", "plus", "demo"}, optional
        Default: demo on synthetic cells, plus on real ones.
    members : iterable of str, optional
        The networks (default: the profile's recipe).
    **options
        Any ``PipelineConfig`` field (folds, epochs, batch_size, input_size, device, seed, export, ...).

    Returns
    -------
    Path
        The report (``<out>/ensemble/report.md``).
    """
    from .pipeline import PipelineConfig, run_pipeline
    from .choices import Profile

    cfg = PipelineConfig(out=str(out), data=str(data) if data else None, profile=Profile(profile) if profile else None,
                         members=tuple(members) if members else None, **options)
    return run_pipeline(cfg)


def _file_row(path: Path) -> ManifestRow:
    """A file's row as ``alldetect predict`` makes it (subject and label from a C-NMC name)."""
    return collect_inputs([path]).rows[0] if path.exists() else ManifestRow(path=str(path))


def _with(row: ManifestRow, field: str, value: str) -> ManifestRow:
    return replace(row, **{field: value})


def _is_pil(item: object) -> bool:
    return type(item).__module__.startswith("PIL.")
