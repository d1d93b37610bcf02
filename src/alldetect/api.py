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

import copy
import functools
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from .choices import AdaptLayers
from .data.images import image_rgb, read_rgb
from .ensemble.adapt import MIN_CELLS, SHARE_CELLS, SHARE_SHIFT, AdaptSettings, check_site_cells
from .ensemble.calibrate import PRIOR_DONORS, calibrate, calibrate_point
from .ensemble.derive import Derived, write_derived
from .ensemble.folder import EnsembleFolder
from .errors import AlldetectError, has_extra
from .formats.manifest import ManifestRow
from .formats.operating_point import OperatingPoint
from .inference.engine import Engine
from .inference.load import load_engine
from .inference.cells import read_cells
from .inference.predict import collect_inputs, score_table
from .inference.table import CellTable
from .inference.torch_engine import TorchEngine
from .models.batchnorm import adapt_batchnorm

logger = logging.getLogger(__name__)
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
    changes : Derived, optional
        What ``adapt`` or ``calibrate`` changed, until ``save`` writes it as a new folder.
    """
    folder: EnsembleFolder
    engine: Engine
    changes: Derived | None = None  # adapted or calibrated here, not yet saved

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
        rows, decoders = _inputs(images, subjects=subjects, labels=labels)
        return score_table(self.engine, rows, {}, tta=tta, domain_check=domain_check, decoders=decoders)


    def adapt(self, cells: Image | Iterable[Image], *, subjects: list[str] | None = None,
              layers: str = AdaptLayers.all.value, site_weight: float = 1.0, min_cells: int = MIN_CELLS) -> Ensemble:
        """This ensemble adapted to a site's imaging batch without labels: each member's BatchNorm statistics
        re-estimated on the site's cells (``ensemble.adapt``). Not written until ``save``.

        Parameters
        ----------
        cells : path, array, PIL image, or a list of them
            Unlabelled cells of one imaging batch (as ``predict`` takes them): many donors, both kinds as they come.
        subjects : list of str, optional
            Each cell's donor; by default parsed from C-NMC file names. Cells of a single donor are refused.
        layers : {"all", "early"}
            Every BatchNorm layer, or only the early ones.
        site_weight : float
            In (0, 1]: 1 takes the site's statistics, less mixes in the training ones.
        min_cells : int
            Fewest usable cells; fewer are refused.

        Returns
        -------
        Ensemble
            The adapted ensemble (torch, on this one's device), ready to score and to ``save``.
        """
        settings = AdaptSettings(layers, site_weight, min_cells)
        rows, decoders = _inputs(cells, subjects=subjects)
        engine = self._torch_engine()
        read = read_cells(engine, decoders, [r.path for r in rows], measure=engine.domain is not None,
                          workers=min(8, os.cpu_count() or 1))
        outside = None if engine.domain is None else int((~engine.domain.check(read.measures).in_domain).sum())
        donors = [rows[i].subject for i in read.kept]
        check_site_cells(len(read.kept), donors, outside, settings)
        members = copy.deepcopy(engine.members)
        adapted = sum(adapt_batchnorm(m, read.crops, layers=settings.layers, site_weight=settings.site_weight)
                      for m in members)
        result = replace(engine, members=members)
        shares = [_called_share(e, read.crops) for e in (engine, result)]
        if abs(shares[1] - shares[0]) > SHARE_SHIFT:
            logger.warning("adapting moved the share of the site's cells called ALL from %.0f%% to %.0f%%: a batch "
                           "made mostly of one kind shifts every cell toward the other; adapt on cells of both kinds "
                           "as they come, mix in the training statistics (site_weight 0.5), or calibrate on a few "
                           "labelled donors instead", 100 * shares[0], 100 * shares[1])
        step = self._step("adapt", cells=len(read.kept), donors=len({d for d in donors if d}),
                          unreadable=len(rows) - len(read.kept), outside=outside, layers=settings.layers,
                          site_weight=settings.site_weight, adapted_layers=adapted,
                          called_all=dict(zip(("before", "after"), shares)))
        spec = replace(engine.spec, site=[*engine.spec.site, step])
        return Ensemble(self.folder, replace(result, spec=spec), Derived(spec, members))

    def calibrate(self, cells: Image | Iterable[Image], labels: list[str] | None = None,
                  subjects: list[str] | None = None, *, prior_donors: float = PRIOR_DONORS) -> Ensemble:
        """This ensemble with its operating points calibrated on labelled cells of a few of a site's donors
        (``ensemble.calibrate``): each method's thresholds fitted on them and shrunk toward the shipped ones. Not
        written until ``save``.

        Parameters
        ----------
        cells : path, array, PIL image, or a list of them
            Labelled cells of at least two ALL and two healthy donors of the site.
        labels, subjects : list of str, optional
            Each cell's truth (``all`` or ``hem``) and donor; by default parsed from C-NMC file names.
        prior_donors : float
            How many site donors the shipped point is worth: the site's fit weighs n / (n + prior_donors).

        Returns
        -------
        Ensemble
            The calibrated ensemble, ready to score and to ``save``; ``site[-1]`` of its spec holds the leave-one-
            donor-out figures the model card quotes.
        """
        rows, decoders = _inputs(cells, subjects=subjects, labels=labels)
        engine = self._torch_engine()
        read = read_cells(engine, decoders, [r.path for r in rows], workers=min(8, os.cpu_count() or 1))
        used = [rows[i] for i in read.kept]
        unlabelled = [r.path for r in used if not r.label]
        if unlabelled:
            raise AlldetectError(f"{unlabelled[0]}: no label ({len(unlabelled)} cell(s) in all); calibrating needs "
                                 "each cell's truth (C-NMC file names, or labels=...)")
        y = np.array([r.y for r in used], dtype=int)
        member_probs = engine.member_probs(read.crops, tta=engine.default_tta)
        spec, method = engine.spec, engine.method
        subjects_used = [r.subject for r in used]
        result = calibrate(spec.operating_point(method), y, spec.fit(method).apply(member_probs), subjects_used,
                           prior_donors=prior_donors)
        points = {name: result.point if name == method else
                  calibrate_point(spec.operating_point(name), y, combiner.apply(member_probs), subjects_used,
                                  prior_donors=prior_donors) for name, combiner in spec.methods.items()}
        step = self._step("calibrate", method=method, prior_donors=prior_donors,
                          shipped=spec.operating_point(method).to_json(), unreadable=len(rows) - len(used),
                          **result.to_json())
        spec = replace(spec, operating_points=points, site=[*spec.site, step])
        members = self.changes.members if self.changes else None
        return Ensemble(self.folder, replace(engine, spec=spec), Derived(spec, members))

    def save(self, folder: str | Path) -> Ensemble:
        """Write this ensemble (adapted, calibrated, or as loaded) as a new portable folder: new weights and hashes,
        the model card saying what was done, the ONNX graphs exported again (dropped, with a note, without the
        ``onnx`` extra). ``folder`` must be new or empty. Returns the new folder, loaded."""
        derived = self.changes or Derived(self.folder.spec)
        exported = self.folder.graph().is_file() or self.folder.graph(int8=True).is_file()
        export = exported and has_extra("onnx")
        if exported and derived.spec.site:
            graphs = "exported again" if export else ("dropped: the onnx extra is not installed; `alldetect export "
                                                      f"{Path(folder).name}` writes them")
            site = [*derived.spec.site[:-1], {**derived.spec.site[-1], "graphs": graphs}]
            derived = replace(derived, spec=replace(derived.spec, site=site))
        if exported and not export:
            logger.warning("%s: the ONNX graphs are not written (the onnx extra is not installed); `alldetect "
                           "export %s` writes them", folder, folder)
        int8 = self.folder.graph(int8=True).is_file()
        written = write_derived(self.folder, derived, folder,
                                finish=_export(int8) if export else None)
        return load(written.path, device=str(self.engine.device) if isinstance(self.engine, TorchEngine) else "auto")

    def _torch_engine(self) -> TorchEngine:
        """The members in torch and fp32 (as the shipped point was fitted), with any adaptation made so far."""
        if isinstance(self.engine, TorchEngine) and self.changes is not None:
            return self.engine
        device = str(self.engine.device) if isinstance(self.engine, TorchEngine) else "cpu"
        return TorchEngine.from_folder(self.folder, method=self.method, device=device, precision="fp32")

    def _step(self, kind: str, **fields: Any) -> dict:
        return {"step": kind, "from": self.folder.model_id, "from_folder": self.folder.path.name,
                "when": datetime.now(timezone.utc).isoformat(timespec="seconds"), **fields}


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


def _inputs(images: Image | Iterable[Image], *, subjects: list[str] | None = None,
            labels: list[str] | None = None) -> tuple[list[ManifestRow], list]:
    """The rows of ``images`` (files and folders as ``predict`` takes them, or decoded images) and how to decode
    each, with ``subjects`` and ``labels`` given in their place when not None."""
    single = isinstance(images, (str, Path, np.ndarray, bytes, bytearray)) or _is_pil(images) or images is None
    items = [images] if single else list(images)
    rows, decoders = [], []
    for i, item in enumerate(items):
        if isinstance(item, (str, Path)):
            found = collect_inputs([item]) if _is_dir(item) else None
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
    return rows, decoders


def _called_share(engine: Engine, crops: np.ndarray) -> float:
    """The share of up to ``SHARE_CELLS`` of ``crops`` (evenly drawn) that ``engine`` calls ALL, without TTA."""
    sample = crops[::max(1, -(-len(crops) // SHARE_CELLS))]
    return float(np.mean(engine.operating_point.cells_all(engine.predict(sample, tta=False).ensemble)))


def _export(int8: bool):
    """The hook that exports a derived folder's graphs (and the int8 copy when the source had one)."""
    def finish(folder: EnsembleFolder) -> None:
        from .export.ensemble import export_ensemble

        export_ensemble(folder, int8=int8)
    return finish


def _file_row(path: Path) -> ManifestRow:
    """A file's row as ``alldetect predict`` makes it (subject and label from a C-NMC name); the file's problems,
    a name the file system refuses included, are its decoder's to tell."""
    return collect_inputs([path]).rows[0] if _exists(path) else ManifestRow(path=str(path))


def _is_dir(item: str | Path) -> bool:
    try:
        return Path(item).is_dir()
    except (OSError, ValueError):
        return False


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except (OSError, ValueError):
        return False


def _with(row: ManifestRow, field: str, value: str) -> ManifestRow:
    return replace(row, **{field: value})


def _is_pil(item: object) -> bool:
    return type(item).__module__.startswith("PIL.")
