"""CSV files as every contract writes and reads them: UTF-8, atomic writes, strict reading, spreadsheet-safe."""

from __future__ import annotations

import csv
import io
import os
import re
import stat
import unicodedata
import tempfile
from pathlib import Path
from typing import TextIO

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


TEMPORARY_NAME_EXTRA = len("..") + len(".tmp") + 8  # what write_csv_atomic's temporary name adds (mkstemp: 8)


def write_csv_atomic(path: str | Path, columns: tuple[str, ...] | list[str], records: list[dict]) -> None:
    """Write the CSV whole or not at all: to a temporary file beside it, then renamed over it. A link is followed
    (the file it names is replaced, the link kept); a path that is, or links to, anything but a regular file (a
    device such as /dev/null, a pipe, a socket, a folder) is refused, never replaced. The file gets the mode it had,
    or a new file's mode under the umask."""
    path = Path(os.path.realpath(path))
    mode = output_file_mode(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="", encoding="utf-8") as f:
            _write(f, columns, records)
            os.fchmod(f.fileno(), mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def output_file_mode(path: str | Path) -> int:
    """The permission bits a file written at ``path`` should get: those of the regular file there, or a new file's
    (0666 under the umask); anything else at ``path`` (after links) is a ``DataError``."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        umask = os.umask(0)  # read by setting it: the only portable way; put back at once
        os.umask(umask)
        return 0o666 & ~umask
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot be written ({getattr(e, 'strerror', None) or e})") from None
    if not stat.S_ISREG(info.st_mode):
        raise DataError(f"{path}: not a regular file (a device, pipe, socket or folder, or a link to one); alldetect "
                        "replaces only files: give the path of a file to write")
    return stat.S_IMODE(info.st_mode)


def append_csv(path: str | Path, columns: tuple[str, ...] | list[str], records: list[dict]) -> None:
    """Add ``records`` to a log CSV (its header first when the file is new), flushed to disk before returning:
    a run killed after this call keeps the rows."""
    if not records:
        return
    path = Path(path)
    new = not path.is_file()
    with open(path, "a", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerows(records)
        f.flush()
        os.fsync(f.fileno())


def csv_text(columns: tuple[str, ...] | list[str], records: list[dict]) -> str:
    """The CSV file ``write_csv_atomic`` would write, as text (for an HTTP answer)."""
    buffer = io.StringIO()
    _write(buffer, columns, records)
    return buffer.getvalue()


def _write(f: TextIO, columns: tuple[str, ...] | list[str], records: list[dict]) -> None:
    writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(records)


# Characters that do not show as themselves: C0/C1 controls, zero-width and bidirectional marks (a name can be
# disguised with them, e.g. U+202E reverses what follows) and the surrogates Python uses for the bytes of a
# file name that is not UTF-8.
_HIDDEN = re.compile("[\\\\\x00-\x1f\x7f-\x9f\u061c\u180e\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff"
                     "\ud800-\udfff]")


_FORMULA = re.compile("(^|[,;\t|\r\n])(\\s*[=+\\-@\uff1d\uff0b\uff0d\uff20])")


def printable(text: str) -> str:
    r"""``text`` in NFC (the composed form: two spellings of one name show as one), with every hidden character
    written as its escape and every backslash doubled, so a name reads as what it is, no escape can be faked by
    typing it, and it can be written as UTF-8 (an undecodable byte of a file name shows as ``\xe9``, a bidi mark
    as ``\u202e``, the typed text ``\u202e`` as ``\\u202e``).

    >>> printable("caf\udce9.bmp"), printable("cell\u202egnp.exe"), printable("UID_1_2_3_all.bmp")
    ('caf\\xe9.bmp', 'cell\\u202egnp.exe', 'UID_1_2_3_all.bmp')
    >>> printable("a\\u202e"), printable("cafe\u0301") == printable("caf\u00e9")
    ('a\\\\u202e', True)
    """
    return _HIDDEN.sub(_escape, unicodedata.normalize("NFC", text))


def _escape(match: re.Match) -> str:
    if match.group() == "\\":
        return "\\\\"
    code = ord(match.group())
    if 0xDC80 <= code <= 0xDCFF:  # os.fsdecode's stand-in for the undecodable byte code - 0xDC00
        return f"\\x{code - 0xDC00:02x}"
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def formula_safe(text: str) -> str:
    """OWASP's rule against CSV injection, for every way a spreadsheet may split a row: wherever a part of the
    cell (its start, or after a comma, semicolon, tab, pipe or line break, which some spreadsheets take as
    separators) starts with = + - @ or their fullwidth forms (＝ ＋ － ＠, which some read as the ASCII ones), a
    single quote goes before it, so a spreadsheet shows the part instead of evaluating it.

    >>> formula_safe("=HYPERLINK(1)"), formula_safe(";=1+1.zip"), formula_safe("\uff1d1"), formula_safe("UID_1.bmp")
    ("'=HYPERLINK(1)", ";'=1+1.zip", "'\uff1d1", 'UID_1.bmp')
    """
    return _FORMULA.sub(lambda m: f"{m.group(1)}'{m.group(2)}", text)