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
from ..formats.labels import cell_call
from ..formats.manifest import ManifestRow
from ..formats.operating_point import OperatingPoint
from ..formats.predictions import prediction_records
from .cells import read_cells, score_cells
from .engine import Engine
from .table import CellTable

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
        try:
            is_dir, exists = item.is_dir(), item.exists()
        except (OSError, ValueError) as e:  # a name too long for the file system, a NUL byte
            rows.append(ManifestRow(path=str(item)))
            errors[str(item)] = f"cannot read: {getattr(e, 'strerror', None) or e}"
            continue
        if is_dir:
            result = index_folder(item, check_images=False, for_manifest=False)
            rows += result.rows
            for p in result.problems:
                if p.action == "skipped":
                    rows.append(ManifestRow(path=p.path))
                    errors[p.path] = p.problem
        elif exists or is_image_file(item):
            name = parse_cell_name(item.name)
            # absolute, but links not followed: the CSV names the file as it was given
            rows.append(ManifestRow(path=os.path.abspath(item) if exists else str(item),
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
    table: CellTable                     # every cell's row, as written
    patients: list[dict] | None = None   # subject-level calls, when every scored cell names its subject
    patients_csv: Path | None = None
    submission: Path | None = None       # the challenge file, for the unlabelled final-test layout

    @property
    def scored(self) -> int:
        return self.table.scored

    @property
    def failed(self) -> int:
        return len(self.table) - self.table.scored

    @property
    def flagged(self) -> list[str]:
        """The cells called ALL."""
        return [self.table.records[i]["path"] for i in self.table.kept if self.table.records[i]["call"] == "ALL"]

    @property
    def operating_point(self) -> OperatingPoint:
        return self.table.operating_point

    @property
    def out_of_domain(self) -> int | None:
        """Scored cells the domain check flagged (None: not checked)."""
        inside = self.table.in_domain
        return None if inside is None else int((~inside[self.table.kept]).sum())


def score_table(model: Engine, rows: list[ManifestRow], errors: dict[str, str], *, tta: bool | None = None,
                batch_size: int | None = None, domain_check: bool = True, geometry: FrameGeometry = FrameGeometry(),
                decoders: list | None = None) -> CellTable:
    """Score ``rows`` (``decoders``: how to get each one's pixels; default: read its file) into the rows of the
    predictions CSV. ``tta`` None: as the ensemble was fitted (``model.default_tta``); the ``model`` column says
    ``<method>+tta`` when TTA is used. With ``domain_check`` and a domain reference in the ensemble, every scored
    cell gets ``in_domain`` and, when outside, a ``domain_note``, and its call is OUTSIDE."""
    tta = model.uses_tta(tta)
    cells = score_cells(model, decoders or _decoders(rows, errors), [r.path for r in rows], tta=tta,
                        batch_size=batch_size, domain_check=domain_check, geometry=geometry,
                        workers=min(8, os.cpu_count() or 1))
    kept, point = cells.kept, model.operating_point
    verdicts = [None] * len(rows) if cells.in_domain is None else [bool(v) for v in cells.in_domain]
    texts = {"call": [cell_call(p, point.cell_threshold, v) for p, v in zip(cells.prob, verdicts)]}
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
    return CellTable(columns, records, prob=cells.prob, y=np.array([r.y for r in rows], dtype=int),
                     subjects=[r.subject for r in rows], kept=kept, in_domain=cells.in_domain, operating_point=point)


def predict_rows(model: Engine, inputs: Inputs, out_csv: str | Path, *, tta: bool | None = None,
                 batch_size: int | None = None, domain_check: bool = True,
                 geometry: FrameGeometry = FrameGeometry()) -> Scored:
    """Write the predictions CSV (see ``score_table``), and the patients file when every scored cell names its
    subject, and the challenge submission file for the unlabelled final-test layout."""
    out_csv = Path(out_csv)
    if domain_check and model.domain is None:
        logger.warning("this ensemble folder has no domain reference (built by an earlier alldetect): cells are "
                       "not checked against its training cells; rebuild it with `alldetect ensemble`")
    rows = inputs.rows
    table = score_table(model, rows, inputs.errors, tta=tta, batch_size=batch_size, domain_check=domain_check,
                        geometry=geometry)
    table.to_csv(out_csv)
    summary = Scored(out_csv, table)
    scored_rows = [rows[i] for i in table.kept]
    if scored_rows and all(r.subject for r in scored_rows):
        patients = table.patients()
        patients_file = patients.to_csv(out_csv.with_name(out_csv.stem + ".patients.csv"))
        summary.patients, summary.patients_csv = patients.records, patients_file
    called = table.operating_point.cells_all(table.prob[table.kept])
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
