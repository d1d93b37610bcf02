"""Preprocessing (paper Sec. 2.1.2): how a decoded cell image becomes a member's input, by pixel-exact center crop
(and, for other frames, the geometry that makes one)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..choices import Colour
from ..errors import ImageProblem
from .images import MAX_PIXELS


def center_crop(image: np.ndarray, size: int, *, path: str = "<array>") -> np.ndarray:
    """The central ``size x size`` window of an ``(H, W, C)`` array, by slicing: no resampling.

    450 -> 300 keeps rows and columns 75..374. Odd margins put the extra pixel after the window.
    """
    height, width = image.shape[:2]
    if height < size or width < size:
        raise ImageProblem(path, f"image is {width}x{height}, smaller than the {size}x{size} center crop")
    top, left = (height - size) // 2, (width - size) // 2
    return image[top:top + size, left:left + size]


@dataclass(frozen=True)
class FrameGeometry:
    """How an image becomes the crop the model sees at its own scale: C-NMC's 450x450 frames are center-cropped
    as they are; frames of another size or magnification can first be rescaled to ``frame_size`` pixels a
    side, and an image that already is the cell's crop (``as_crop``) is resized to the crop whole. A rescale that
    would make more than ``max_pixels`` pixels (a long thin image) is refused before it is made."""
    frame_size: int | None = None
    as_crop: bool = False
    max_pixels: int = MAX_PIXELS

    def crop(self, pixels: np.ndarray, crop: int, *, name: str) -> np.ndarray:
        if self.as_crop:
            return _resized(pixels, crop, crop)
        if self.frame_size:
            height, width = pixels.shape[:2]
            scale = self.frame_size / min(height, width)
            size = (round(width * scale), round(height * scale))
            if size[0] * size[1] > self.max_pixels:
                raise ImageProblem(name, f"{width}x{height} rescaled to a shorter side of {self.frame_size} would be "
                                         f"{size[0]}x{size[1]} pixels, beyond the {self.max_pixels:,}-pixel limit (not "
                                         "a cell's frame)")
            pixels = _resized(pixels, *size)
        return center_crop(pixels, crop, path=name)

    def describe(self, crop: int) -> str:
        """What the geometry does, for the CSV ("" for C-NMC's own)."""
        if self.as_crop:
            return f"whole image resized to the {crop}x{crop} crop"
        return f"shorter side rescaled to {self.frame_size}, then the {crop}x{crop} center crop" if self.frame_size \
            else ""


@dataclass(frozen=True)
class Preprocess:
    """How a decoded cell image becomes a member's input: the pixel-exact ``crop`` x ``crop`` center crop (see
    ``FrameGeometry`` for other frames), resized to ``input_size`` when there is one, and how the member then
    sets its colour (``choices.Colour``; done inside the member, see ``transforms.normalize``). The spec and the
    exported graph both carry it."""
    crop: int
    input_size: int | None = None
    colour: str = Colour.imagenet.value

    @property
    def side(self) -> int:
        """The side of the model's input."""
        return self.input_size or self.crop

    def cut(self, pixels: np.ndarray, *, name: str, geometry: FrameGeometry = FrameGeometry()) -> np.ndarray:
        """The crop at the image's own scale (what the domain check measures)."""
        return geometry.crop(pixels, self.crop, name=name)

    def resize(self, crop: np.ndarray) -> np.ndarray:
        """A crop at the model's input side."""
        return crop if self.side == crop.shape[0] else _resized(crop, self.side, self.side)

    def apply(self, pixels: np.ndarray, *, name: str, geometry: FrameGeometry = FrameGeometry()) -> np.ndarray:
        """The model's input from a decoded cell."""
        return self.resize(self.cut(pixels, name=name, geometry=geometry))

    def to_json(self) -> dict:
        return {"crop": self.crop, "input_size": self.input_size, "colour": self.colour}

    @classmethod
    def from_json(cls, raw: dict) -> Preprocess:
        """As ``to_json`` wrote it (without ``colour``: written before it existed, the ImageNet normalisation)."""
        return cls(raw["crop"], raw["input_size"], raw.get("colour", Colour.imagenet.value))


def _resized(pixels: np.ndarray, width: int, height: int) -> np.ndarray:
    return np.asarray(Image.fromarray(pixels).resize((width, height), Image.BILINEAR))
