"""The manifest contract: one CSV row per image, ``path,label,subject,split`` plus ``image,cell,source``.

``label`` is ``all``, ``hem`` or empty (unlabelled); ``split`` is ``train``, ``val``, ``test`` or empty
(not assigned, e.g. unlabelled images). An empty ``subject`` means the subject is unknown.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from ..errors import DataError
from .csvfiles import read_csv_checked, write_csv_atomic
from .labels import LABEL_NAMES, Label
from .problems import Problem

REQUIRED_COLUMNS = ("path", "label", "subject", "split")
OPTIONAL_COLUMNS = ("image", "cell", "source")
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class ManifestRow:
    path: str
    label: str = ""
    subject: str = ""
    split: str = ""
    image: str = ""
    cell: str = ""
    source: str = ""

    @property
    def y(self) -> Label:
        return Label.from_text(self.label)

    def with_split(self, split: str) -> ManifestRow:
        return replace(self, split=split)


COLUMNS = tuple(f.name for f in fields(ManifestRow))


def write_manifest(rows: list[ManifestRow], path: str | Path) -> None:
    """Write rows atomically (a half-written manifest never replaces a good one)."""
    write_csv_atomic(path, COLUMNS, [asdict(r) for r in rows])


def nameable(rows: list[ManifestRow]) -> tuple[list[ManifestRow], list[Problem]]:
    """Rows a manifest can name, and a problem for each it cannot: a path that is not UTF-8 (bytes of another
    encoding, e.g. Latin-1 names from a shared drive) has no UTF-8 text that opens the file again."""
    kept, problems = [], []
    for row in rows:
        try:
            row.path.encode("utf-8")
            kept.append(row)
        except UnicodeEncodeError:
            problems.append(Problem(row.path, "file name is not UTF-8 text (shown with \\x escapes): "
                                                         "a manifest cannot name it; rename the file", "skipped"))
    return kept, problems


def read_manifest(path: str | Path) -> list[ManifestRow]:
    """Read and validate a manifest; errors name the file, the line and the problem."""
    rows = []
    for line, raw in read_csv_checked(path, REQUIRED_COLUMNS, kind="manifest"):
        row = ManifestRow(**{c: (raw.get(c) or "").strip() for c in COLUMNS})
        if row.label not in LABEL_NAMES:
            raise DataError(f"{path}:{line}: label {row.label!r} is not 'all', 'hem' or empty")
        if row.split not in (*SPLITS, ""):
            raise DataError(f"{path}:{line}: split {row.split!r} is not one of {SPLITS} or empty")
        rows.append(row)
    return rows


def summarize(rows: list[ManifestRow], by: str = "source") -> list[dict]:
    """Images and subjects per (group, label): the table ``index`` and ``split`` print."""
    groups: dict[tuple[str, str], list[ManifestRow]] = {}
    for r in rows:
        groups.setdefault((getattr(r, by), r.label or "unlabelled"), []).append(r)
    table = []
    for (group, label), members in sorted(groups.items()):
        subjects = {r.subject for r in members if r.subject}
        table.append({by: group or "-", "label": label, "images": len(members), "subjects": len(subjects)})
    return table

