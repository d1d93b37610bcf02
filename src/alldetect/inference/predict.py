"""Score new cells with a trained ensemble: files, folders or a C-NMC tree in, a predictions CSV out.

Unreadable files become rows with an ``error`` and no probability; the rest go on. When subjects can be
parsed from the names, a patient-level summary is written too; for the unlabelled final-test layout,
the challenge submission file (one 0/1 per line, in file-number order).
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data.images import read_rgb
from ..data.index import index_folder
from ..data.names import is_image_file, parse_cell_name
from ..data.geometry import FrameGeometry
from ..errors import DataError
from ..evaluation.evaluate import subject_level
from ..formats.csvfiles import write_csv_atomic
from ..formats.manifest import ManifestRow
from ..formats.operating_point import OperatingPoint
from ..formats.predictions import prediction_records
from .cells import read_cells, score_cells
from .engine import Engine

logger = logging.getLogger(__name__)


@dataclass
class Inputs:
    rows: list[ManifestRow]            # every input image, readable or not
    errors: dict[str, str]             # path -> why it cannot be scored


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


def load_crops_for(model: Engine, rows: list[ManifestRow], errors: dict[str, str]) -> tuple[np.ndarray, list[int]]:
    """uint8 model inputs of the readable rows and their indices; failures are added to ``errors``."""
    read = read_cells(model, _decoders(rows, errors), [r.path for r in rows])
    errors.update({rows[i].path: e for i, e in enumerate(read.errors) if e})
    return read.crops, read.kept


def _decoders(rows: list[ManifestRow], errors: dict[str, str]) -> list:
    return [errors.get(r.path) or functools.partial(read_rgb, r.path) for r in rows]


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
                 batch_size: int | None = None, domain_check: bool = True,
                 geometry: FrameGeometry = FrameGeometry()) -> Scored:
    """Write the predictions CSV (+ patients and submission files). ``tta`` None: as the
    ensemble was fitted (``model.default_tta``); the ``model`` column says ``<method>+tta`` when TTA is used.
    With ``domain_check`` and a domain reference in the ensemble, every scored cell gets ``in_domain`` and,
    when outside, a ``domain_note``; the patient summary counts them (see ``subject_level``)."""
    out_csv = Path(out_csv)
    tta = model.uses_tta(tta)
    rows = inputs.rows
    if domain_check and model.domain is None:
        logger.warning("this ensemble folder has no domain reference (built by an earlier alldetect): cells are "
                       "not checked against its training cells; rebuild it with `alldetect ensemble`")
    cells = score_cells(model, _decoders(rows, inputs.errors), [r.path for r in rows], tta=tta,
                        batch_size=batch_size, domain_check=domain_check, geometry=geometry,
                        workers=min(8, os.cpu_count() or 1))
    kept = cells.kept
    texts = {}
    if cells.in_domain is not None:
        texts["in_domain"] = _on_scored(["yes" if v else "no" for v in cells.in_domain], kept)
        texts["domain_note"] = cells.domain_notes
    if geometry != FrameGeometry():
        texts["geometry"] = _on_scored([geometry.describe(model.preprocess.crop)] * len(rows), kept)
    name = f"{model.method}+tta" if tta else model.method
    columns, records = prediction_records(
        [r.path for r in rows], [r.label for r in rows], {name: cells.prob}, subjects=[r.subject for r in rows],
        errors=cells.errors, warnings=cells.warnings,
        texts=texts, extra={f"prob_{m}": cells.members[k] for k, m in enumerate(model.names)}, spreadsheet_safe=True)
    write_csv_atomic(out_csv, columns, records)
    scored_rows = [rows[i] for i in kept]
    ens = cells.prob[kept]
    in_domain = None if cells.in_domain is None else cells.in_domain[kept]
    point = model.operating_point
    called = point.cells_all(ens)
    summary = Scored(out_csv, len(kept), len(rows) - len(kept), [r.path for r, c in zip(scored_rows, called) if c],
                     point, out_of_domain=None if in_domain is None else int((~in_domain).sum()))
    if scored_rows and all(r.subject for r in scored_rows):
        y = np.array([r.y for r in scored_rows])
        patients = subject_level(y, ens, [r.subject for r in scored_rows], point=point, in_domain=in_domain)
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


def _on_scored(values: list[str], kept: list[int]) -> list[str]:
    """``values`` on the scored rows, "" on the others."""
    scored = set(kept)
    return [v if i in scored else "" for i, v in enumerate(values)]
