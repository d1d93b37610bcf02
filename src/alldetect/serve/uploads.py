"""Turning untrusted uploads into decoded cells, in memory only: size limits, type by content, zip rules,
decompression-bomb guards. Nothing from an upload is written to disk."""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass
from pathlib import PurePosixPath

import numpy as np

from ..data.images import decode_rgb
from ..errors import ImageProblem

IMAGE_FORMATS = ("BMP", "PNG", "JPEG", "TIFF")
ZIP_MAGIC = b"PK\x03\x04"


class UploadRejected(Exception):
    """The whole request is refused; ``status`` is the HTTP code, the message says why."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Limits:
    max_request_bytes: int = 50 * 1024 * 1024     # all uploaded bytes of one request
    max_files: int = 500                          # cells per request, zip entries included
    max_unzipped_bytes: int = 200 * 1024 * 1024   # sum of a zip's entries once inflated
    max_pixels: int = 4_000_000                   # per image, checked before decoding (C-NMC: 0.2 MP)


@dataclass
class UploadedCell:
    name: str                   # file name as uploaded (or zip entry path)
    group: str                  # the zip it came from, "" for a loose file
    data: bytes
    pixels: np.ndarray | None = None
    error: str = ""


def expand_uploads(files: list[tuple[str, bytes]], limits: Limits) -> list[UploadedCell]:
    """Loose images and zips of images -> cells, with every request-level rule enforced."""
    total = sum(len(data) for _, data in files)
    if total > limits.max_request_bytes:
        raise UploadRejected(413, f"upload of {total:,} bytes exceeds the {limits.max_request_bytes:,}-byte limit")
    if not files:
        raise UploadRejected(400, "no files in the request; send one or more images or a zip as 'files'")
    cells: list[UploadedCell] = []
    for name, data in files:
        if data.startswith(ZIP_MAGIC):
            cells += _unzip(name, data, limits)
        else:
            cells.append(UploadedCell(name, "", data))
        if len(cells) > limits.max_files:
            raise UploadRejected(413, f"more than {limits.max_files} files in one request")
    for cell in cells:
        try:
            cell.pixels = decode_rgb(io.BytesIO(cell.data), name=cell.name, max_pixels=limits.max_pixels,
                                     formats=IMAGE_FORMATS)[0]
        except ImageProblem as e:
            cell.error = e.reason
    return cells


def _unzip(name: str, data: bytes, limits: Limits) -> list[UploadedCell]:
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        raise UploadRejected(400, f"{name}: not a readable zip file") from None
    entries = [e for e in archive.infolist() if not e.is_dir()]
    for entry in entries:
        path = PurePosixPath(entry.filename.replace("\\", "/"))
        if path.is_absolute() or ".." in path.parts or (path.parts and ":" in path.parts[0]):
            raise UploadRejected(400, f"{name}: entry {entry.filename!r} has an absolute path or '..'; refused")
    if len(entries) > limits.max_files:
        raise UploadRejected(413, f"{name}: {len(entries)} entries, more than the {limits.max_files} allowed")
    declared = sum(e.file_size for e in entries)
    if declared > limits.max_unzipped_bytes:
        raise UploadRejected(413, f"{name}: inflates to {declared:,} bytes, more than the "
                                  f"{limits.max_unzipped_bytes:,} allowed")
    cells = []
    inflated = 0
    for entry in entries:
        if PurePosixPath(entry.filename).name.startswith(".") or entry.filename.startswith("__MACOSX/"):
            continue
        with archive.open(entry) as f:
            content = f.read(limits.max_unzipped_bytes - inflated + 1)  # never trust the declared sizes
        inflated += len(content)
        if inflated > limits.max_unzipped_bytes:
            raise UploadRejected(413, f"{name}: inflates beyond the {limits.max_unzipped_bytes:,}-byte limit")
        cells.append(UploadedCell(entry.filename, PurePosixPath(name).stem, content))
    return cells
