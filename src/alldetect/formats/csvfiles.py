"""CSV files as every contract writes and reads them: UTF-8, atomic writes, strict reading, spreadsheet-safe."""

from __future__ import annotations

import csv
import os
import tempfile
from pathlib import Path

from ..errors import DataError


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


def formula_safe(text: str) -> str:
    """OWASP's rule against CSV injection: a cell starting with = + - @ (or tab, carriage return) gets a
    leading single quote, so a spreadsheet shows it instead of evaluating it.

    >>> formula_safe("=HYPERLINK(1)"), formula_safe("UID_1_2_3_all.bmp")
    ("'=HYPERLINK(1)", 'UID_1_2_3_all.bmp')
    """
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text
