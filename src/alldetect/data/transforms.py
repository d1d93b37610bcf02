"""Augmentation (paper Sec. 2.1.2) and per-model normalisation; the crop itself is ``data.geometry``'s.

Images travel as uint8 (cache, datasets, workers); conversion to float and normalisation with a member's
own mean/std happen last, on the device, so the same uint8 batch can feed every member.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .. import _torchvision  # noqa: F401  (first: lets torchvision import beside a CPU-only torch)
from torchvision.transforms import v2  # noqa: E402

# The paper names flips, rotation, zoom and shift without ranges. Cells have no orientation, so any rotation is
# valid; shift and zoom of 10% keep the cell inside a 300 px crop.
PAPER_ROTATION, PAPER_SHIFT, PAPER_ZOOM = 180.0, 0.1, 0.1
# Stain and illumination differ per donor and batch. Brightness, saturation and hue jitter leave the black
# background black (contrast jitter would grey it, so it is left out).
STAIN_BRIGHTNESS, STAIN_SATURATION, STAIN_HUE = 0.15, 0.3, 0.04
# augmentations that draw from the eight symmetries of the square: scoring averages over all eight (TTA)
DIHEDRAL_AUGMENTATIONS = ("dihedral", "dihedral+stain")


def train_augmentation(*, rotation: float = PAPER_ROTATION, shift: float = PAPER_SHIFT,
                       zoom: float = PAPER_ZOOM) -> v2.Transform:
    """The paper's augmentation on uint8 CHW tensors: horizontal and vertical flips, rotation, zoom, shift.
    Uncovered corners are filled with the black background."""
    return v2.Compose([
        v2.RandomHorizontalFlip(),
        v2.RandomVerticalFlip(),
        v2.RandomAffine(degrees=rotation, translate=(shift, shift), scale=(1 - zoom, 1 + zoom),
                        interpolation=v2.InterpolationMode.BILINEAR, fill=0),
    ])


class RandomRot90(torch.nn.Module):
    """Rotate a CHW tensor by 0 or 90 degrees, at random; with both flips this draws each of the square's eight
    symmetries with equal probability, without resampling a single pixel."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.rot90(image, 1, dims=(-2, -1)) if torch.rand(()) < 0.5 else image


def dihedral_augmentation() -> v2.Transform:
    """One of the eight flips and 90-degree rotations of the cell, uniformly: cells have no orientation, and
    unlike free rotation nothing is interpolated and no corner is filled."""
    return v2.Compose([v2.RandomHorizontalFlip(), v2.RandomVerticalFlip(), RandomRot90()])


def stain_jitter() -> v2.Transform:
    """Random brightness, saturation and hue of the cell, as stain and illumination vary between batches."""
    return v2.ColorJitter(brightness=STAIN_BRIGHTNESS, saturation=STAIN_SATURATION, hue=STAIN_HUE)


def augmentation(name: str) -> v2.Transform | None:
    """The training augmentation called ``name`` (``TrainConfig.augment``): paper, dihedral, dihedral+stain or
    none."""
    return {"paper": train_augmentation, "dihedral": dihedral_augmentation,
            "dihedral+stain": lambda: v2.Compose([dihedral_augmentation(), stain_jitter()]),
            "none": lambda: None}[name]()


def batch_augmentation(name: str) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The augmentation ``name`` for a whole uint8 NCHW batch on its own device (a GPU keeps itself fed; CPU
    workers drawing one image at a time would not): the same transformation family and ranges as
    ``augmentation(name)``, a fresh draw per image, uint8 in and out. Random draws come from torch's global
    generator: seed it per step for exact resumption."""
    if name == "none":
        return None
    if name == "dihedral":
        return _dihedral_batch
    if name == "dihedral+stain":
        return StainBatchJitter()
    return PaperBatchAugmentation()


class StainBatchJitter(torch.nn.Module):
    """``dihedral+stain`` for a batch: one of the eight symmetries, then kornia's brightness, saturation and hue
    jitter with ``stain_jitter``'s ranges, a fresh draw per image."""

    def __init__(self):
        super().__init__()
        import kornia.augmentation as K

        self.jitter = K.ColorJitter(brightness=STAIN_BRIGHTNESS, saturation=STAIN_SATURATION, hue=STAIN_HUE, p=1.0)

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        out = self.jitter(_dihedral_batch(batch).float().div_(255.0))
        return out.mul_(255.0).round_().clamp_(0, 255).to(torch.uint8)


class PaperBatchAugmentation(torch.nn.Module):
    """``train_augmentation`` for a batch: kornia's flips and affine (every image gets its own draw), black
    fill, bilinear resampling, on whatever device the batch is."""

    def __init__(self):
        super().__init__()
        import kornia.augmentation as K  # maintained batched geometric augmentation, CPU or GPU

        self.ops = torch.nn.Sequential(
            K.RandomHorizontalFlip(p=0.5), K.RandomVerticalFlip(p=0.5),
            K.RandomAffine(degrees=PAPER_ROTATION, translate=(PAPER_SHIFT, PAPER_SHIFT),
                           scale=(1 - PAPER_ZOOM, 1 + PAPER_ZOOM), resample="bilinear", padding_mode="zeros", p=1.0))

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        out = self.ops(batch.float().div_(255.0))
        return out.mul_(255.0).round_().clamp_(0, 255).to(torch.uint8)


def dihedral_views(x: torch.Tensor) -> list[torch.Tensor]:
    """The eight symmetries of the square: four 90-degree rotations, each with and without a flip."""
    rotations = [torch.rot90(x, k, dims=(2, 3)) for k in range(4)]
    return rotations + [torch.flip(r, dims=(3,)) for r in rotations]


def _dihedral_batch(batch: torch.Tensor) -> torch.Tensor:
    """One of the eight symmetries per image, drawn uniformly; exact (no resampling)."""
    n = len(batch)
    draws = torch.rand(3, n, device=batch.device) < 0.5
    batch = torch.where(draws[0].view(n, 1, 1, 1), batch.flip(-1), batch)
    batch = torch.where(draws[1].view(n, 1, 1, 1), batch.flip(-2), batch)
    return torch.where(draws[2].view(n, 1, 1, 1), batch.rot90(1, dims=(-2, -1)), batch)


def normalize(batch: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 (or [0, 1] float) NCHW -> float normalised with a model's ImageNet mean/std."""
    x = batch.float().div_(255.0) if batch.dtype == torch.uint8 else batch.float()
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s
