"""Where each step's training pixels come from, augmented, on the training device.

Two sources, both exactly resumable (batches and augmentation are functions of (seed, epoch, step)):

- ``ResidentBatches``: the training crops are held whole, on the training device when they fit (the paper's
  11,644 images at 300 px are 3 GB of a GPU's memory), and every step gathers its batch and augments it there as
  one batch, with draws from a generator seeded per step. Nothing is read back to the host inside an epoch, so
  the host queues steps ahead of the GPU.
- ``LoaderBatches``: DataLoader workers read and augment one image at a time (what keeps a CPU busy).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..data.dataset import CellDataset
from ..data.transforms import BatchAugmentation, augmentation
from .sampler import EpochBatches
from .split_images import SplitImages

logger = logging.getLogger(__name__)
RESIDENT_SHARE = 0.4  # at most this share of the GPU's free memory holds the training crops


def step_seed(seed: int, step: int, rank: int) -> int:
    """The seed of one step's batched augmentation: a function of (seed, step, rank) alone, so a resumed run
    draws exactly what the uninterrupted one drew."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])


class ResidentBatches:
    """Batches gathered from crops held in one tensor and augmented as a batch on ``device``."""

    def __init__(self, train: SplitImages, batches: EpochBatches, device: torch.device,
                 augment: BatchAugmentation | None, *, seed: int):
        self.batches, self.device, self.augment, self.seed = batches, device, augment, seed
        self.positions, self.labels = np.asarray(train.positions), train.labels
        self.images = _resident_images(train.images, device)
        self.generator = torch.Generator(device=device)

    def epoch(self, epoch: int, *, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(uint8 NCHW images, labels) on the device for each step of ``epoch`` from ``start_step`` on."""
        steps = self.batches.epoch(epoch, start_step=start_step)
        items = np.fromiter((i for batch in steps for i, _ in batch), dtype=np.int64)
        rows = self.positions[items]
        on_device = isinstance(self.images, torch.Tensor)
        device_rows = torch.from_numpy(rows).to(self.device) if on_device else None  # one upload an epoch
        labels = torch.from_numpy(self.labels[items]).to(self.device)
        bounds = np.cumsum([0] + [len(batch) for batch in steps]).tolist()
        first = epoch * self.batches.steps_per_epoch + start_step
        for k, (start, end) in enumerate(zip(bounds, bounds[1:])):
            if on_device:
                images = self.images[device_rows[start:end]]
            else:  # crops left on the host: gather there, then one copy
                images = torch.from_numpy(self.images[rows[start:end]])
                if self.device.type == "cuda":
                    images = images.pin_memory().to(self.device, non_blocking=True)
            images = images.permute(0, 3, 1, 2)  # NHWC storage: a channels_last NCHW view
            if self.augment is not None:
                self.generator.manual_seed(step_seed(self.seed, first + k, self.batches.rank))
                images = self.augment(images, self.generator)
            yield images, labels[start:end]


class LoaderBatches:
    """Batches read and augmented one image at a time by DataLoader workers."""

    def __init__(self, train: SplitImages, batches: EpochBatches, device: torch.device, augment: str, *,
                 workers: int, seed: int):
        self.batches, self.device, self.workers, self.seed = batches, device, workers, seed
        self.dataset = CellDataset(train.images, train.labels, augmentation(augment), positions=train.positions)

    def epoch(self, epoch: int, *, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        loader = DataLoader(self.dataset, batch_sampler=self.batches.epoch(epoch, start_step=start_step),
                            num_workers=self.workers, pin_memory=self.device.type == "cuda",
                            generator=torch.Generator().manual_seed(self.seed))
        for images, labels in loader:
            yield images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)


def _resident_images(images: np.ndarray, device: torch.device) -> torch.Tensor | np.ndarray:
    """The crops on ``device`` when it is a GPU with room for them; else the host array as it is."""
    if device.type != "cuda":
        return images
    free, _ = torch.cuda.mem_get_info(device)
    if images.nbytes > RESIDENT_SHARE * free:
        logger.info("training crops (%.1f GiB) left on the host: more than %.0f%% of the GPU's free memory",
                    images.nbytes / 2**30, 100 * RESIDENT_SHARE)
        return images
    out = torch.empty(images.shape, dtype=torch.uint8, device=device)
    chunk = max(1, (256 << 20) // max(1, images[0].nbytes))
    for start in range(0, len(images), chunk):  # read the memmap in pieces: no second whole copy on the host
        out[start:start + chunk].copy_(torch.from_numpy(np.array(images[start:start + chunk])))
    return out
