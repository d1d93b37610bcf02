"""Score new cells with a trained ensemble: files, folders or a C-NMC tree in, a predictions CSV out.

Unreadable files become rows with an ``error`` and no probability; the rest go on. When subjects can be
parsed from the names, a patient-level summary is written too; for the unlabelled final-test layout,
the challenge submission file (one 0/1 per line, in file-number order).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..data.images import read_rgb
from ..data.index import index_folder
from ..data.names import is_image_file, parse_cell_name
from ..data.cell_measures import MEASURES, cell_measures
from ..data.transforms import FrameGeometry, model_input
from ..errors import DataError, ImageProblem
from ..evaluation.evaluate import subject_level
from ..formats.csvfiles import write_csv_atomic
from ..formats.operating_point import OperatingPoint
from ..formats.manifest import ManifestRow
from ..formats.predictions import prediction_records
from .engine import Engine

logger = logging.getLogger(__name__)


@dataclass
class Inputs:
    rows: list[ManifestRow]            # every input image, readable or not
    errors: dict[str, str]             # path -> why it cannot be scored
    warnings: dict[str, str] = field(default_factory=dict)  # path -> what was done to it to score it


def collect_inputs(inputs: list[str | Path]) -> Inputs:
    """Files as given; folders indexed (C-NMC trees included) with unreadable files kept as errors."""
    rows: list[ManifestRow] = []
    errors: dict[str, str] = {}
    for item in map(Path, inputs):
        if item.is_dir():
            result = index_folder(item, check_images=False, for_manifest=False)
            rows += result.rows
            for p in result.problems:
                if p.action == "skipped":
                    rows.append(ManifestRow(path=p.path))
                    errors[p.path] = p.problem
        elif item.exists() or is_image_file(item):
            name = parse_cell_name(item.name)
            rows.append(ManifestRow(path=str(item.resolve()) if item.exists() else str(item),
                                    label=name.label if name else "", subject=name.subject if name else "",
                                    source="files"))
        else:
            raise DataError(f"{item}: no such file or folder")
    if not rows:
        raise DataError("no input images")
    return Inputs(rows, errors)


@dataclass
class Cells:
    """The readable rows' model inputs, their row indices and, when asked for, their ``cell_measures``."""
    crops: np.ndarray
    kept: list[int]
    measures: np.ndarray | None = None


def read_cells(model: Engine, rows: list[ManifestRow], errors: dict[str, str],
               warnings: dict[str, str] | None = None, *, geometry: FrameGeometry = FrameGeometry(),
               measure: bool = False) -> Cells:
    """uint8 model inputs of the readable rows; failures are added to ``errors``, conversions (transparency,
    grey levels, palettes) to ``warnings``. ``measure``: also the measures of each crop at its own scale, for
    the domain check."""
    side = model.input_size or model.crop
    crops, kept, measures = [], [], []
    for i, row in enumerate(tqdm(rows, desc="reading cells", unit="img", leave=False, disable=None)):
        if row.path in errors:
            continue
        try:
            rgb, note = read_rgb(row.path)
            crop = geometry.crop(rgb, model.crop, name=row.path)
        except ImageProblem as e:
            errors[row.path] = e.reason
            continue
        crops.append(model_input(crop, model.input_size))
        if measure:
            measures.append(cell_measures(crop[None])[0])
        if note and warnings is not None:
            warnings[row.path] = note
        kept.append(i)
    return Cells(np.stack(crops) if crops else np.zeros((0, side, side, 3), np.uint8), kept,
                 (np.stack(measures) if measures else np.zeros((0, len(MEASURES)))) if measure else None)


def load_crops_for(model: Engine, rows: list[ManifestRow], errors: dict[str, str]) -> tuple[np.ndarray, list[int]]:
    """``read_cells``' crops and row indices."""
    cells = read_cells(model, rows, errors)
    return cells.crops, cells.kept


@dataclass
class Scored:
    """What ``predict_rows`` wrote and found."""
    csv: Path
    scored: int
    failed: int
    flagged: list[str]                   # cells called ALL
    operating_point: OperatingPoint      # the calls' thresholds
    patients: list[dict] | None = None   # subject-level calls, when every scored cell names its subject
    patients_csv: Path | None = None
    submission: Path | None = None       # the challenge file, for the unlabelled final-test layout
    out_of_domain: int | None = None     # scored cells the domain check flagged (None: not checked)


def predict_rows(model: Engine, inputs: Inputs, out_csv: str | Path, *, tta: bool | None = None,
                 batch_size: int = 32, domain_check: bool = True,
                 geometry: FrameGeometry = FrameGeometry()) -> Scored:
    """Write the predictions CSV (+ patients and submission files). ``tta`` None: as the
    ensemble was fitted (``model.default_tta``); the ``model`` column says ``<method>+tta`` when TTA is used.
    With ``domain_check`` and a domain reference in the ensemble, every scored cell gets ``in_domain`` and,
    when outside, a ``domain_note``; the patient summary counts them (see ``subject_level``)."""
    out_csv = Path(out_csv)
    tta = model.default_tta if tta is None else tta
    rows, errors, warnings = inputs.rows, dict(inputs.errors), dict(inputs.warnings)
    check = domain_check and model.domain is not None
    if domain_check and not check:
        logger.warning("this ensemble folder has no domain reference (built by an earlier alldetect): cells are "
                       "not checked against its training cells; rebuild it with `alldetect ensemble`")
    cells = read_cells(model, rows, errors, warnings, geometry=geometry, measure=check)
    kept = cells.kept
    ens, members = _batched(model, cells.crops, tta, batch_size)
    verdict = model.domain.check(cells.measures) if check else None
    name = f"{model.method}+tta" if tta else model.method
    texts = {}
    if verdict is not None:
        texts["in_domain"] = _scatter_text(["yes" if v else "no" for v in verdict.in_domain], kept, len(rows))
        texts["domain_note"] = _scatter_text(verdict.notes, kept, len(rows))
    if geometry != FrameGeometry():
        texts["geometry"] = _scatter_text([geometry.describe(model.crop)] * len(kept), kept, len(rows))
    columns, records = prediction_records(
        [r.path for r in rows], [r.label for r in rows], {name: _scatter(ens, kept, len(rows))},
        subjects=[r.subject for r in rows], errors=[errors.get(r.path, "") for r in rows],
        warnings=[warnings.get(r.path, "") for r in rows], texts=texts,
        extra={f"prob_{m}": _scatter(members[k], kept, len(rows)) for k, m in enumerate(model.names)},
        spreadsheet_safe=True)
    write_csv_atomic(out_csv, columns, records)
    scored_rows = [rows[i] for i in kept]
    point = model.operating_point
    called = point.cells_all(ens)
    summary = Scored(out_csv, len(kept), len(rows) - len(kept), [r.path for r, c in zip(scored_rows, called) if c],
                     point, out_of_domain=None if verdict is None else int((~verdict.in_domain).sum()))
    if scored_rows and all(r.subject for r in scored_rows):
        y = np.array([r.y for r in scored_rows])
        patients = subject_level(y, ens, [r.subject for r in scored_rows], point=point,
                                 in_domain=None if verdict is None else verdict.in_domain)
        patients_file = out_csv.with_name(out_csv.stem + ".patients.csv")
        write_csv_atomic(patients_file, list(patients[0]), patients)
        summary.patients, summary.patients_csv = patients, patients_file
    final = [(int(Path(r.path).stem), int(c)) for r, c in zip(scored_rows, called)
             if r.source == "final" and Path(r.path).stem.isdigit()]
    if final:
        submission = out_csv.with_name(out_csv.stem + ".submission.txt")
        submission.write_text("".join(f"{call}\n" for _, call in sorted(final)))
        summary.submission = submission
    return summary


def _scatter_text(values: list[str], kept: list[int], n: int) -> list[str]:
    out = [""] * n
    for i, value in zip(kept, values):
        out[i] = value
    return out


def _scatter(values: np.ndarray, kept: list[int], n: int) -> np.ndarray:
    """Values of the scored rows placed at their row indices; NaN for rows that could not be scored."""
    out = np.full(n, np.nan)
    out[kept] = values
    return out


def _batched(model: Engine, crops: np.ndarray, tta: bool,
             batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    if len(crops) == 0:
        return np.zeros(0), np.zeros((len(model.names), 0))
    ens_parts, member_parts = [], []
    for start in tqdm(range(0, len(crops), batch_size), desc="scoring" + (" (TTA)" if tta else ""), unit="batch",
                      leave=False, disable=None):
        ens, members = model.predict(crops[start:start + batch_size], tta=tta)
        ens_parts.append(ens)
        member_parts.append(members)
    return np.concatenate(ens_parts), np.concatenate(member_parts, axis=1)
