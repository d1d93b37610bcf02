"""Read cell images safely: every failure becomes an ``ImageProblem`` naming the file and the reason."""

from __future__ import annotations

import io
import stat
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import ImageProblem, first_line

# C-NMC cells are 450x450 (0.2 MP). Anything above this is not a single-cell image and may be a
# decompression bomb; refuse it before decoding (Pillow's own limit is ~179 MP, far too lax here).
MAX_PIXELS = 25_000_000
EMPTY_FILE = "empty file (0 bytes)"
# What a cell image may be, decided by content. GIF is not among them: its 256-colour palette changes the
# stain's colours.
IMAGE_FORMATS = ("BMP", "PNG", "JPEG", "TIFF")


def read_rgb(path: str | Path, *, max_pixels: int = MAX_PIXELS) -> tuple[np.ndarray, str | None]:
    """Decode an image file to an ``(H, W, 3)`` uint8 RGB array.

    Returns the array and a note when the file was not plain RGB and had to be converted
    (grayscale, palette, transparency, 16-bit), else None. Raises ``ImageProblem`` for an empty, missing,
    corrupt, truncated, non-image, multi-page or oversized file.
    """
    path = Path(path)
    try:
        info = path.stat()
    except FileNotFoundError:
        raise ImageProblem(path, "file not found") from None
    except (OSError, ValueError) as e:  # ValueError: a NUL byte in the path
        raise ImageProblem(path, f"cannot read: {getattr(e, 'strerror', None) or e}") from None
    if not stat.S_ISREG(info.st_mode):  # a device would be read for ever, a pipe waited on
        raise ImageProblem(path, "not a regular file (a device, pipe, socket or folder)")
    if info.st_size == 0:
        raise ImageProblem(path, EMPTY_FILE)
    return decode_rgb(path, name=str(path), max_pixels=max_pixels)


def decode_rgb(source: Path | BinaryIO, *, name: str, max_pixels: int = MAX_PIXELS) -> tuple[np.ndarray, str | None]:
    """``read_rgb`` for a path or an open binary stream (e.g. an upload); ``name`` labels errors."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source, formats=IMAGE_FORMATS) as img:
                width, height = img.size
                if width * height > max_pixels:
                    raise ImageProblem(
                        name, f"{width}x{height} pixels exceeds the {max_pixels:,}-pixel limit "
                        "(not a single-cell image, or a decompression bomb)")
                _single_page(img, name)
                img.load()
                return _to_rgb(img, name)
    except ImageProblem:
        raise
    except UnidentifiedImageError:
        raise ImageProblem(name, f"not an image file Pillow can identify (accepted: {', '.join(IMAGE_FORMATS)})") \
            from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageProblem(name, "refused as a possible decompression bomb") from None
    except Exception as e:  # a crafted file can make a decoder raise anything (a page without a size: TypeError)
        raise ImageProblem(name, f"corrupt or truncated image ({type(e).__name__}: {first_line(e)})") from None


def _single_page(img: Image.Image, name: str, *, most: int = 16) -> None:
    """Refuse an image of several pages or frames: which is the cell is not ours to guess. Pages are counted up
    to ``most`` (``n_frames`` would walk every one: minutes for a crafted file of 80,000 pages)."""
    if not getattr(img, "is_animated", False):
        return
    pages = 1
    try:
        while pages <= most:
            img.seek(pages)
            pages += 1
    except EOFError:
        pass
    count = f"{pages} pages" if pages <= most else f"more than {most} pages"
    raise ImageProblem(name, f"holds {count}; a cell image has one: save the page to score as its own file")


def image_rgb(image: Image.Image | np.ndarray | bytes, *, name: str,
              max_pixels: int = MAX_PIXELS) -> tuple[np.ndarray, str | None]:
    """``read_rgb`` for an image already in memory: a PIL image, an array that Pillow reads as one ((H, W) grey,
    (H, W, 3) RGB, (H, W, 4) RGBA; uint8, 16-bit or float grey), or the bytes of an image file; ``name`` labels
    errors. Anything else, or an image that cannot be read, is an ``ImageProblem``."""
    if isinstance(image, np.ndarray):
        try:
            image = Image.fromarray(np.ascontiguousarray(image))
        except (TypeError, ValueError, KeyError):
            raise ImageProblem(name, f"a {image.dtype} array of shape {image.shape} is not an image: give (H, W, 3) "
                                     "uint8 RGB") from None
    if isinstance(image, (bytes, bytearray, memoryview)):
        return decode_rgb(io.BytesIO(bytes(image)), name=name, max_pixels=max_pixels)
    if not isinstance(image, Image.Image):
        raise ImageProblem(name, f"a {type(image).__name__} is not an image: give a path, an array, a PIL image or "
                                 "the bytes of an image file")
    try:
        width, height = image.size
        if width * height > max_pixels:
            raise ImageProblem(name, f"{width}x{height} pixels exceeds the {max_pixels:,}-pixel limit (not a "
                                     "single-cell image)")
        _single_page(image, name)
        return _to_rgb(image, name)
    except ImageProblem:
        raise
    except Exception as e:  # closed, truncated, or of a mode Pillow cannot convert ("La")
        raise ImageProblem(name, f"a PIL image that cannot be read ({type(e).__name__}: {first_line(e)})") from None


def _to_rgb(img: Image.Image, name: str) -> tuple[np.ndarray, str | None]:
    mode = img.mode
    if mode == "RGB":
        return np.asarray(img, dtype=np.uint8), None
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
        return _without_alpha(np.asarray(img.convert("RGBA"), dtype=np.uint8), mode)
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = max(arr.max(), 1.0)
        gray = np.round(arr * (255.0 / (65535.0 if top > 255 else 255.0))).clip(0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2), f"{mode} image scaled to 8 bits and converted to RGB"
    if mode == "F":  # 32-bit float: Pillow's own conversion truncates 0-1 values to black
        arr = np.asarray(img, dtype=np.float64)
        if not np.isfinite(arr).all():
            raise ImageProblem(name, "floating-point image holds NaN or infinite values")
        low, high = float(arr.min()), float(arr.max())
        if low < 0 or high > 255:
            raise ImageProblem(name, f"floating-point image with values {low:g}..{high:g}, outside 0-1 and 0-255: "
                                     "its intensity scale is unknown")
        scale = 255.0 if high <= 1.0 else 1.0
        gray = np.round(arr * scale).clip(0, 255).astype(np.uint8)
        source = "0-1" if scale > 1 else "0-255"
        return np.repeat(gray[..., None], 3, axis=2), f"floating-point image scaled from {source} to 8 bits, as RGB"
    return np.asarray(img.convert("RGB"), dtype=np.uint8), f"{mode} image converted to RGB"


def _without_alpha(rgba: np.ndarray, mode: str) -> tuple[np.ndarray, str | None]:
    """Transparent pixels become C-NMC's black background; an alpha channel that hides nothing is dropped, and
    one that hides everything (some tools write 0 for "no alpha") is ignored rather than blacking out the cell."""
    rgb, alpha = rgba[..., :3], rgba[..., 3]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgb), None
    if alpha.max() == 0:
        return np.ascontiguousarray(rgb), f"{mode} image fully transparent: alpha ignored, its colours scored"
    weight = alpha[..., None].astype(np.float32) / 255
    composited = np.round(rgb * weight).astype(np.uint8)
    share = float((alpha < 255).mean())
    return composited, f"{mode} image: {share:.0%} of pixels (partly) transparent, composited onto black"
