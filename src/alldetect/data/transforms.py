"""Augmentation (paper Sec. 2.1.2) and per-model normalisation; the crop itself is ``data.geometry``'s.

Images travel as uint8 (cache, datasets, workers); conversion to float and normalisation with a member's
own mean/std happen last, on the device, so the same uint8 batch can feed every member.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ..choices import Augmentation, Colour
from ..errors import require_extra

from .. import _torchvision  # noqa: F401  (first: lets torchvision import beside a CPU-only torch)
from torchvision.transforms import v2  # noqa: E402

# The paper names flips, rotation, zoom and shift without ranges. Cells have no orientation, so any rotation is
# valid; shift and zoom of 10% keep the cell inside a 300 px crop.
PAPER_ROTATION, PAPER_SHIFT, PAPER_ZOOM = 180.0, 0.1, 0.1
# Stain and illumination differ per donor and batch. Brightness, saturation and hue jitter leave the black
# background black (contrast jitter would grey it, so it is left out).
STAIN_BRIGHTNESS, STAIN_SATURATION, STAIN_HUE = 0.15, 0.3, 0.04
# augmentations that draw from the eight symmetries of the square: scoring averages over all eight (TTA)
DIHEDRAL_AUGMENTATIONS = (Augmentation.dihedral.value, Augmentation.dihedral_stain.value,
                          Augmentation.dihedral_hestain.value)


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


class StainMatrixJitter(torch.nn.Module):
    """Albumentations' ``HEStain`` on a uint8 CHW cell: its optical density split into two stains by one of eight
    reference stain matrices drawn at random, each stain's amount scaled and shifted at random, and put back; the
    black background stays black. Drawn from torch's generator, so a seeded worker repeats it."""

    def __init__(self):
        super().__init__()
        require_extra("augment", "the dihedral+hestain augmentation")
        import albumentations

        self.stain = albumentations.HEStain(method="random_preset", p=1.0)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        self.stain.set_random_seed(int(torch.randint(2**31, ())))
        out = self.stain(image=np.ascontiguousarray(image.permute(1, 2, 0).numpy()))["image"]
        stained = image.amax(0, keepdim=True) > round(STAINED * 255)
        return torch.where(stained, torch.from_numpy(out).permute(2, 0, 1), image)


def augmentation(name: str) -> v2.Transform | None:
    """The training augmentation called ``name`` (``TrainConfig.augment``): paper, dihedral, dihedral+stain,
    dihedral+hestain or none."""
    return {"paper": train_augmentation, "dihedral": dihedral_augmentation,
            "dihedral+stain": lambda: v2.Compose([dihedral_augmentation(), stain_jitter()]),
            "dihedral+hestain": lambda: v2.Compose([dihedral_augmentation(), StainMatrixJitter()]),
            "none": lambda: None}[name]()


def batch_augmentation(name: str) -> BatchAugmentation | None:
    """The augmentation ``name`` for a whole uint8 NCHW batch on its own device (a GPU keeps itself fed; CPU
    workers drawing one image at a time would not): the same transformation family and ranges as
    ``augmentation(name)``, a fresh draw per image, uint8 in and out. Every draw comes from the ``generator``
    passed in, on the batch's device, so nothing is read back to the host and a run seeded per step resumes
    exactly. ``HOST_AUGMENTATIONS`` have no batched form."""
    return {"paper": PaperBatchAugmentation, "dihedral": DihedralBatch, "dihedral+stain": StainBatchJitter,
            "none": lambda: None}[name]()


class BatchAugmentation:
    """A batched augmentation: ``augment(batch, generator)``, uint8 NCHW in and out."""

    def __call__(self, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError


class DihedralBatch(BatchAugmentation):
    """One of the eight symmetries per image, drawn uniformly; exact (no resampling)."""

    def __call__(self, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        n = len(batch)
        draws = (_uniform(3, n, generator=generator, device=batch.device) < 0.5).view(3, n, 1, 1, 1)
        batch = torch.where(draws[0], batch.flip(-1), batch)
        batch = torch.where(draws[1], batch.flip(-2), batch)
        return torch.where(draws[2], batch.rot90(1, dims=(-2, -1)), batch)


class StainBatchJitter(BatchAugmentation):
    """``dihedral+stain`` for a batch: one of the eight symmetries, then brightness, saturation and hue jitter with
    ``stain_jitter``'s ranges (kornia's colour functions), a fresh draw per image."""

    def __init__(self):
        require_extra("augment", "the dihedral+stain augmentation on the device")

    def __call__(self, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        from kornia.enhance import adjust_hue, adjust_saturation

        n, device = len(batch), batch.device
        brightness, saturation, hue = (_uniform(n, generator=generator, device=device, low=-r, high=r)
                                       for r in (STAIN_BRIGHTNESS, STAIN_SATURATION, STAIN_HUE))
        x = DihedralBatch()(batch, generator).float().div_(255.0)
        x = x.mul_((1 + brightness).view(n, 1, 1, 1)).clamp_(0, 1)
        x = adjust_saturation(x, 1 + saturation).clamp_(0, 1)
        x = adjust_hue(x, hue * 2 * math.pi)  # torchvision's hue factor is a fraction of the colour circle
        return x.mul_(255.0).round_().clamp_(0, 255).to(torch.uint8)


class PaperBatchAugmentation(BatchAugmentation):
    """``train_augmentation`` for a batch: flips, rotation, zoom and shift drawn per image and applied as one
    bilinear resampling with black fill (torch's ``affine_grid``/``grid_sample``), on whatever device the batch
    is. Written on torch's primitives rather than kornia's ``RandomAffine``: kornia checks its inputs and draws on
    the host every call, which stalls a GPU at every step."""

    def draw(self, n: int, generator: torch.Generator, device: torch.device) -> dict[str, torch.Tensor]:
        """Per image: ``angle`` (degrees), ``scale``, ``shift`` ((n, 2), fractions of the side) and ``flip``
        ((n, 2) booleans: horizontal, vertical)."""
        return {"flip": _uniform(n, 2, generator=generator, device=device) < 0.5,
                "angle": _uniform(n, generator=generator, device=device, low=-PAPER_ROTATION, high=PAPER_ROTATION),
                "scale": _uniform(n, generator=generator, device=device, low=1 - PAPER_ZOOM, high=1 + PAPER_ZOOM),
                "shift": _uniform(n, 2, generator=generator, device=device, low=-PAPER_SHIFT, high=PAPER_SHIFT)}

    def __call__(self, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        n = len(batch)
        p = self.draw(n, generator, batch.device)
        # affine_grid wants, per image, where each output pixel comes from: the inverse of
        # "flip, rotate by angle and scale about the centre, then shift" in [-1, 1] coordinates
        angle = torch.deg2rad(p["angle"])
        cos, sin = torch.cos(angle) / p["scale"], torch.sin(angle) / p["scale"]
        inverse = torch.stack([torch.stack([cos, sin], -1), torch.stack([-sin, cos], -1)], -2)  # R(-angle) / scale
        flips = torch.where(p["flip"], -1.0, 1.0)
        inverse = inverse * flips.view(n, 2, 1)  # flipping first: its inverse flips last
        offset = -(inverse @ (2 * p["shift"]).view(n, 2, 1))
        grid = F.affine_grid(torch.cat([inverse, offset], 2), list(batch.shape), align_corners=False)
        out = F.grid_sample(batch.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        return out.round_().clamp_(0, 255).to(torch.uint8)


def _uniform(*shape: int, generator: torch.Generator, device: torch.device, low: float = 0.0,
             high: float = 1.0) -> torch.Tensor:
    return torch.rand(*shape, generator=generator, device=device).mul_(high - low).add_(low)


def dihedral_views(x: torch.Tensor) -> list[torch.Tensor]:
    """The eight symmetries of the square: four 90-degree rotations, each with and without a flip."""
    rotations = [torch.rot90(x, k, dims=(2, 3)) for k in range(4)]
    return rotations + [torch.flip(r, dims=(3,)) for r in rotations]


STAINED = 8 / 255  # a pixel brighter than this in some channel is the cell; C-NMC's segmented background is 0


def normalize(batch: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...],
              colour: str = Colour.imagenet.value) -> torch.Tensor:
    """uint8 (or [0, 1] float) NCHW -> float normalised with a model's ImageNet mean/std, or with each cell's
    own colour (``choices.Colour``): centred on the mean of its stained pixels and, to ``standardise``, scaled by
    their spread, so that a batch's stain and brightness weigh less than the cell's shape and texture."""
    x = batch.float().div_(255.0) if batch.dtype == torch.uint8 else batch.float()
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    if colour == Colour.imagenet:
        return (x - torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)) / s
    stained = (x.amax(1, keepdim=True) > STAINED).to(x.dtype)
    pixels = stained.sum((2, 3), keepdim=True).clamp_min(1.0)
    centred = (x - (x * stained).sum((2, 3), keepdim=True) / pixels) * stained
    if colour == Colour.centre:
        return centred / s
    spread = (centred.square().sum((2, 3), keepdim=True) / pixels).sqrt().clamp_min(1 / 255)
    return centred / spread
