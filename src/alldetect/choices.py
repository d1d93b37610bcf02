"""Every set of named choices, defined once: the command line, the configs, the ensemble spec, the web app and
the library take them from here (combiner methods are the registered ``ensemble.combiners.COMBINERS``, precisions
``precision.Precision``)."""

from __future__ import annotations

from enum import Enum

from .errors import AlldetectError


class Choice(str, Enum):
    """A str Enum: Typer lists its values in the help and refuses others; ``checked`` does so for the library."""

    @classmethod
    def checked(cls, value: str, what: str) -> str:
        """``value`` if it is one of the choices, else a one-line error naming them."""
        try:
            return cls(value).value
        except ValueError:
            raise AlldetectError(f"unknown {what} {value!r}; choose one of {', '.join(cls.values())}") from None

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return tuple(c.value for c in cls)


class Profile(Choice):
    """Named sets of training defaults; an option given explicitly always wins over the profile."""
    demo = "demo"    # minutes on a laptop CPU with the built-in synthetic set
    paper = "paper"  # the paper's protocol, exactly
    plus = "plus"    # the paper's networks and data, trained the way that generalised to unseen donors


class Device(Choice):
    auto = "auto"  # CUDA when present, else the CPU
    cpu = "cpu"
    cuda = "cuda"


class Engine(Choice):
    """What scores an ensemble folder (``inference.load.load_engine``)."""
    auto = "auto"                # the fastest accurate engine the folder and the machine allow
    onnx = "onnx"                # onnxruntime on the exported graph (int8 where exported)
    torch = "torch"              # the members in torch
    prefer_onnx = "prefer-onnx"  # the exported graph when there is one, else auto (the web app's default)


class History(Choice):
    """What the web app's /history shows."""
    private = "private"  # each browser its own requests
    shared = "shared"    # every request
    off = "off"          # nothing


class Criterion(Choice):
    """How an operating point's cell threshold is chosen."""
    auto = "auto"                            # balanced accuracy when cross-fitted, else the paper's 0.5
    paper = "paper"                          # 0.5
    balanced_accuracy = "balanced_accuracy"  # maximising balanced accuracy
    sensitivity = "sensitivity"              # the highest threshold with at least the target sensitivity
    specificity = "specificity"              # the lowest threshold with at least the target specificity


FITTED_CRITERIA = (Criterion.balanced_accuracy.value, Criterion.sensitivity.value, Criterion.specificity.value)


class Augmentation(Choice):
    paper = "paper"                    # flips, rotation, zoom, shift (the paper's)
    dihedral = "dihedral"              # one of the eight flips and quarter turns
    dihedral_stain = "dihedral+stain"  # and brightness, saturation and hue jitter
    dihedral_hestain = "dihedral+hestain"  # and albumentations' HEStain: stain matrix and amounts drawn anew
    none = "none"


# done by a numpy library one image at a time: DataLoader workers run them, never the training device
HOST_AUGMENTATIONS = (Augmentation.dihedral_hestain.value,)


class Colour(Choice):
    """How a member sets each cell's colour before its network: inside the member, so training, scoring, the web
    page and the exported graph all do it alike."""
    imagenet = "imagenet"        # the network's own ImageNet mean and std (the paper)
    centre = "centre"            # each cell's mean colour over its stained pixels subtracted (background stays 0)
    standardise = "standardise"  # and each channel divided by the cell's own spread over those pixels


class Sampling(Choice):
    """What one epoch's images are drawn from."""
    cells = "cells"    # every training cell, the minority class oversampled to the majority's count (the paper)
    donors = "donors"  # classes as large, and within a class each donor as large whatever its cell count: drawn
                       # afresh every epoch from each donor's cells
    batches = "batches"  # as donors, but within a class each imaging batch (the manifest's source) first


class AugmentOn(Choice):
    auto = "auto"      # device on CUDA, loader on a CPU
    loader = "loader"  # per image, in DataLoader workers
    device = "device"  # the whole batch, on the training device


class Optimizer(Choice):
    adamax = "adamax"  # the paper's
    adamw = "adamw"


class Schedule(Choice):
    triangular2 = "triangular2"  # the paper's cyclic learning rate
    cosine = "cosine"            # linear warm-up, then cosine to 0


class AdaptLayers(Choice):
    """Which BatchNorm layers ``alldetect adapt`` re-estimates on a site's cells."""
    all = "all"      # every one
    early = "early"  # the first third (stem and first stages: stain and illumination)


class Executor(Choice):
    """Where `alldetect run` trains its members and folds."""
    none = "none"    # one after another in this process
    local = "local"  # as local processes (submitit), at most --jobs at once
    slurm = "slurm"  # as one SLURM job array (submitit)
