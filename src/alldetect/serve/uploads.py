"""Turning untrusted uploads into cells, in memory only: size limits per request, type by content, zip rules,
decompression-bomb guards, and a pixel budget per request checked from the image headers before anything is
decoded. Nothing from an upload is written to disk; a cell is decoded only when it is cropped."""

from __future__ import annotations

import hashlib
import io
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import PurePosixPath

import numpy as np
from PIL import Image

from ..data.images import EMPTY_FILE, IMAGE_FORMATS, decode_rgb
from ..errors import first_line
from ..formats.csvfiles import printable

ZIP_MAGIC = b"PK\x03\x04"


class UploadRejected(Exception):
    """The whole request is refused; ``status`` is the HTTP code, the message says why."""

    def __init__(self, status: int, message: str, *, retry_after: int | None = None):
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


@dataclass(frozen=True)
class Limits:
    max_request_bytes: int = 50 * 1024 * 1024      # all uploaded bytes of one request, counted as they arrive
    max_files: int = 500                           # cells per request, zip entries included
    max_unzipped_bytes: int = 200 * 1024 * 1024    # all zip entries of one request, once inflated
    max_pixels: int = 4_000_000                    # per image, checked before decoding (C-NMC: 0.2 MP)
    max_request_pixels: int = 100_000_000          # all images of one request (500 C-NMC frames, max_files of them)


@dataclass
class UploadedCell:
    name: str                   # file name as uploaded (or zip entry path)
    group: str                  # the zip it came from, "" for a loose file
    sha256: str
    data: bytes | None          # the encoded image; dropped once the cell is cropped
    error: str = ""


def expand_uploads(files: list[tuple[str, bytes]], limits: Limits) -> list[UploadedCell]:
    """Loose images and zips of images -> cells, with every request-level rule enforced. A bad file or zip
    entry becomes a cell with an ``error``; the request as a whole is refused only when it breaks a limit."""
    total = sum(len(data) for _, data in files)
    if total > limits.max_request_bytes:
        raise UploadRejected(413, f"upload of {total:,} bytes exceeds the {limits.max_request_bytes:,}-byte limit")
    if not files:
        raise UploadRejected(400, "no files in the request; send one or more images or a zip as 'files'")
    cells: list[UploadedCell] = []
    unzipped = [0]  # shared by every zip of the request
    for name, data in files:
        if data.startswith(ZIP_MAGIC):
            cells += _unzip(name, data, limits, unzipped)
        else:
            cells.append(_cell(name, "", data))
        if len(cells) > limits.max_files:
            raise UploadRejected(413, f"more than {limits.max_files} files in one request (the server's --max-files)")
    pixels = sum(_declared_pixels(cell, limits) for cell in cells)
    if pixels > limits.max_request_pixels:
        raise UploadRejected(413, f"the images of this request hold {pixels / 1e6:,.0f} megapixels, more than the "
                                  f"{limits.max_request_pixels / 1e6:,.0f} a request may hold (the server's "
                                  "--max-request-megapixels)")
    return cells


def decode_cell(cell: UploadedCell, limits: Limits) -> tuple[np.ndarray, str | None]:
    """The cell's RGB pixels and what was done to them (see ``decode_rgb``); raises ``ImageProblem`` naming the
    cell."""
    return decode_rgb(io.BytesIO(cell.data), name=cell.name, max_pixels=limits.max_pixels)


def _cell(name: str, group: str, data: bytes, error: str = "") -> UploadedCell:
    """A cell named as it will be shown everywhere: hidden characters escaped (see ``printable``)."""
    return UploadedCell(printable(name), printable(group), hashlib.sha256(data).hexdigest(), data,
                        error or (EMPTY_FILE if not data else ""))


def _declared_pixels(cell: UploadedCell, limits: Limits) -> int:
    """Width x height from the image header (nothing decoded); 0 for what is not an image or is over the
    per-image limit (those cells fail on their own when decoded)."""
    if cell.error:
        return 0
    try:
        with Image.open(io.BytesIO(cell.data), formats=IMAGE_FORMATS) as img:
            width, height = img.size
    except Exception:  # noqa: BLE001  (Pillow raises many types for bad headers; decode_cell reports them)
        return 0
    return width * height if width * height <= limits.max_pixels else 0


def _unzip(name: str, data: bytes, limits: Limits, unzipped: list[int]) -> list[UploadedCell]:
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        entries = [e for e in archive.infolist() if not e.is_dir()]
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError, OSError):
        return [_cell(name, "", data, error="not a readable zip file")]
    for entry in entries:
        path = PurePosixPath(entry.filename.replace("\\", "/"))
        if path.is_absolute() or ".." in path.parts or (path.parts and ":" in path.parts[0]):
            raise UploadRejected(400, f"{name}: entry {entry.filename!r} has an absolute path or '..'; refused")
    if len(entries) > limits.max_files:
        raise UploadRejected(413, f"{name}: {len(entries)} entries, more than the {limits.max_files} allowed")
    declared = sum(e.file_size for e in entries)
    if unzipped[0] + declared > limits.max_unzipped_bytes:
        raise UploadRejected(413, f"{name}: inflates to {declared:,} bytes; the request may inflate to at most "
                                  f"{limits.max_unzipped_bytes:,}")
    group = PurePosixPath(name).stem
    cells = []
    for entry in entries:
        if PurePosixPath(entry.filename).name.startswith(".") or entry.filename.startswith("__MACOSX/"):
            continue
        try:
            with archive.open(entry) as f:
                content = f.read(limits.max_unzipped_bytes - unzipped[0] + 1)  # never trust the declared sizes
        except (zipfile.BadZipFile, zlib.error, NotImplementedError, RuntimeError, EOFError, OSError,
                ValueError) as e:
            cells.append(_cell(entry.filename, group, b"", error=f"unreadable zip entry ({_reason(e)})"))
            continue
        unzipped[0] += len(content)
        if unzipped[0] > limits.max_unzipped_bytes:
            raise UploadRejected(413, f"{name}: inflates beyond the {limits.max_unzipped_bytes:,}-byte limit of "
                                      "one request")
        cells.append(_cell(entry.filename, group, content))
    return cells


def _reason(error: BaseException) -> str:
    """Why an entry could not be read, in words (zipfile's messages are terse or name internals)."""
    text = first_line(error)
    if isinstance(error, RuntimeError) and "encrypted" in text:
        return "encrypted; send it without a password"
    if isinstance(error, NotImplementedError):
        return f"unsupported compression: {text}"
    return text
