"""Preprocessing (paper Sec. 2.1.2): pixel-exact center crop, the paper's augmentation, per-model normalisation.

Images travel as uint8 (cache, datasets, workers); conversion to float and normalisation with a member's
own mean/std happen last, on the device, so the same uint8 batch can feed every member.
"""

from __future__ import annotations

import numpy as np
import torch

from .. import _torchvision  # noqa: F401  (first: lets torchvision import beside a CPU-only torch)
from torchvision.transforms import v2  # noqa: E402

from ..errors import ImageProblem


def center_crop(image: np.ndarray, size: int, *, path: str = "<array>") -> np.ndarray:
    """The central ``size x size`` window of an ``(H, W, C)`` array, by slicing: no resampling.

    450 -> 300 keeps rows and columns 75..374. Odd margins put the extra pixel after the window.
    """
    height, width = image.shape[:2]
    if height < size or width < size:
        raise ImageProblem(path, f"image is {width}x{height}, smaller than the {size}x{size} center crop")
    top, left = (height - size) // 2, (width - size) // 2
    return image[top:top + size, left:left + size]


def train_augmentation(*, rotation: float = 180.0, shift: float = 0.1, zoom: float = 0.1) -> v2.Transform:
    """The paper's augmentation on uint8 CHW tensors: horizontal and vertical flips, rotation, zoom, shift.

    The paper names these without ranges. Cells have no orientation, so any rotation is valid; shift and
    zoom of 10% keep the cell inside a 300 px crop. Uncovered corners are filled with the black background.
    """
    return v2.Compose([
        v2.RandomHorizontalFlip(),
        v2.RandomVerticalFlip(),
        v2.RandomAffine(degrees=rotation, translate=(shift, shift), scale=(1 - zoom, 1 + zoom),
                        interpolation=v2.InterpolationMode.BILINEAR, fill=0),
    ])


def normalize(batch: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 (or [0, 1] float) NCHW -> float normalised with a model's ImageNet mean/std."""
    x = batch.float().div_(255.0) if batch.dtype == torch.uint8 else batch.float()
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s
