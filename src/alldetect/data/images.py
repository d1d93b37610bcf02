"""Read cell images safely: every failure becomes an ``ImageProblem`` naming the file and the reason."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import ImageProblem

# C-NMC cells are 450x450 (0.2 MP). Anything above this is not a single-cell image and may be a
# decompression bomb; refuse it before decoding (Pillow's own limit is ~179 MP, far too lax here).
MAX_PIXELS = 25_000_000
EMPTY_FILE = "empty file (0 bytes)"


def read_rgb(path: str | Path, *, max_pixels: int = MAX_PIXELS) -> tuple[np.ndarray, str | None]:
    """Decode an image file to an ``(H, W, 3)`` uint8 RGB array.

    Returns the array and a note when the file was not plain RGB and had to be converted
    (grayscale, palette, RGBA composited on black, 16-bit), else None. Raises ``ImageProblem`` for an
    empty, missing, corrupt, truncated, non-image or oversized file.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ImageProblem(path, "file not found") from None
    except OSError as e:
        raise ImageProblem(path, f"cannot read: {e.strerror or e}") from None
    if size == 0:
        raise ImageProblem(path, EMPTY_FILE)
    return decode_rgb(path, name=str(path), max_pixels=max_pixels)


def decode_rgb(source: Path | BinaryIO, *, name: str, max_pixels: int = MAX_PIXELS,
               formats: tuple[str, ...] | None = None) -> tuple[np.ndarray, str | None]:
    """``read_rgb`` for a path or an open binary stream (e.g. an upload); ``name`` labels errors.
    ``formats`` (Pillow names such as "PNG") restricts what is accepted, decided by content, not name."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source, formats=formats) as img:
                width, height = img.size
                if width * height > max_pixels:
                    raise ImageProblem(
                        name, f"{width}x{height} pixels exceeds the {max_pixels:,}-pixel limit "
                        "(not a single-cell image, or a decompression bomb)")
                img.load()
                return _to_rgb(img, name)
    except ImageProblem:
        raise
    except UnidentifiedImageError:
        raise ImageProblem(name, "not an image file Pillow can identify"
                           + (f" (accepted: {', '.join(formats)})" if formats else "")) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageProblem(name, "refused as a possible decompression bomb") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageProblem(name, f"corrupt or truncated image ({e})") from None


def _to_rgb(img: Image.Image, name: str) -> tuple[np.ndarray, str | None]:
    mode = img.mode
    if mode == "RGB":
        return np.asarray(img, dtype=np.uint8), None
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        rgb = Image.alpha_composite(black, rgba).convert("RGB")
        return np.asarray(rgb, dtype=np.uint8), f"{mode} image composited on black and converted to RGB"
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
