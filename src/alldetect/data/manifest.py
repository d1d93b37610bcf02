"""The manifest contract: one CSV row per image, ``path,label,subject,split`` plus ``image,cell,source``.

``label`` is ``all``, ``hem`` or empty (unlabelled); ``split`` is ``train``, ``val``, ``test`` or empty
(not assigned, e.g. unlabelled images). An empty ``subject`` means the subject is unknown.
"""

from __future__ import annotations

import csv
import os
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from ..errors import DataError

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
    def y(self) -> int:
        """Numeric label: 1 = ALL, 0 = HEM."""
        return 1 if self.label == "all" else 0

    def with_split(self, split: str) -> ManifestRow:
        return replace(self, split=split)


COLUMNS = tuple(f.name for f in fields(ManifestRow))


def write_manifest(rows: list[ManifestRow], path: str | Path) -> None:
    """Write rows atomically (a half-written manifest never replaces a good one)."""
    write_csv_atomic(path, COLUMNS, [asdict(r) for r in rows])


def read_manifest(path: str | Path) -> list[ManifestRow]:
    """Read and validate a manifest; errors name the file, the line and the problem."""
    rows = []
    for line, raw in read_csv_checked(path, REQUIRED_COLUMNS, kind="manifest"):
        row = ManifestRow(**{c: (raw.get(c) or "").strip() for c in COLUMNS})
        if row.label not in ("all", "hem", ""):
            raise DataError(f"{path}:{line}: label {row.label!r} is not 'all', 'hem' or empty")
        if row.split not in (*SPLITS, ""):
            raise DataError(f"{path}:{line}: split {row.split!r} is not one of {SPLITS} or empty")
        rows.append(row)
    return rows


def read_csv_checked(path: str | Path, required: tuple[str, ...], *, kind: str) -> list[tuple[int, dict]]:
    """``(line number, row)`` pairs of a UTF-8 CSV (a byte-order mark is allowed) that exists, has the
    ``required`` columns, no column twice and no row longer or shorter than its header, else a ``DataError``
    naming the file, the line and the problem (a decimal comma shows up as a row that is too long)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: {kind} file not found")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = next(reader, [])
            records = list(reader)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); save the {kind} file as UTF-8 "
                        "CSV") from None
    except csv.Error as e:
        raise DataError(f"{path}: not a readable CSV file ({e})") from None
    doubled = sorted({c for c in header if header.count(c) > 1})
    if doubled:
        raise DataError(f"{path}:1: column(s) {', '.join(doubled)} appear more than once")
    missing = [c for c in required if c not in header]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}; a {kind} file needs "
                        f"{','.join(required)}")
    rows = []
    for line, values in enumerate(records, start=2):
        if not values:
            continue  # a blank line
        if len(values) != len(header):
            raise DataError(f"{path}:{line}: {len(values)} fields where the header has {len(header)} (a comma "
                            "inside a value, e.g. a decimal comma, needs quotes)")
        rows.append((line, dict(zip(header, values))))
    return rows


def write_csv_atomic(path: str | Path, columns: tuple[str, ...] | list[str], records: list[dict]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
            writer.writeheader()
            writer.writerows(records)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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


def label_counts(rows: list[ManifestRow]) -> Counter:
    return Counter(r.label or "unlabelled" for r in rows)
