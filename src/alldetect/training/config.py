"""Every training knob in one frozen config, with the paper's values as defaults, checked when it is made."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from ..choices import (HOST_AUGMENTATIONS, AugmentOn, Augmentation, Colour, Optimizer, Profile, Sampling,
                       Schedule)
from ..data.geometry import Preprocess
from ..errors import AlldetectError

# fields that change where or how fast a run goes, never what it learns
MACHINERY = frozenset({"device", "workers", "compile", "checkpoint_every", "cache_dir"})
LOCATION = frozenset({"out", "manifest"})  # where a run reads and writes: a moved run is still the same run
# fields added after runs were made, with the value that does what those runs did (a run records no such field)
ADDED_FIELDS = {"colour": Colour.imagenet.value}
# validation metric -> direction; "last" keeps the final epoch whatever validation says
SELECTION = {"ba": "max", "auc": "max", "kappa": "max", "wfs": "max", "acc": "max", "val_loss": "min",
             "last": "last"}


@dataclass(frozen=True)
class TrainConfig:
    member: str = "densenet121"
    manifest: str = ""                  # manifest CSV with train/val (and optionally test) splits
    out: str = "runs/densenet121"       # run directory
    # data (paper Sec. 2.1.2)
    crop: int = 300                     # pixel-exact center crop of the 450x450 frame
    input_size: int | None = None       # resize after cropping; None feeds the crop itself (paper)
    colour: str = Colour.imagenet.value # choices.Colour: the member's ImageNet normalisation (paper) or the cell's
    oversample: bool = True             # replicate minority-class images up to the majority count
    sampling: str = "cells"             # choices.Sampling: cells (with oversample, the paper's), donors or batches
    augment: str = "paper"              # choices.Augmentation
    augment_on: str = "auto"            # choices.AugmentOn (the device's batches: training.batches)
    # optimisation (paper Sec. 2.2)
    epochs: int = 12                    # one triangular2 cycle is 2 x 6 epochs: keep a multiple of 12
    batch_size: int = 32
    optimizer: str = "adamax"           # choices.Optimizer
    lr: float = 2e-4                    # Adamax initial lr; as in Keras CLR the schedule sets lr from step 0
    betas: tuple[float, float] = (0.9, 0.999)  # no momentum cycling: beta1 stays 0.9
    eps: float = 1e-7                   # Keras' Adamax epsilon
    weight_decay: float = 0.0           # decoupled (AdamW); the paper uses none
    schedule: str = "triangular2"       # choices.Schedule
    clr_low: float = 1e-7               # triangular2 bounds
    clr_high: float = 2e-3
    clr_step_epochs: int = 6            # StepSize = 6 x iterations per epoch
    warmup_epochs: float = 0.0          # cosine: epochs of linear warm-up
    label_smoothing: float = 0.0
    ema_decay: float = 0.0              # 0: off; else the weights validated and kept are an exponential moving
                                        # average of the trained ones, updated every step with this decay
    select_metric: str = "ba"           # validation metric that picks the kept epoch (see SELECTION)
    # weights
    pretrained: bool = True             # ImageNet weights (hub, or the member's offline source)
    weights: str | None = None          # local ImageNet weights: a file, or a folder with one per member
    # machinery
    seed: int = 0
    device: str = "auto"                # "auto": cuda when present, else cpu
    workers: int = -1                   # DataLoader workers; -1: min(8, cpus) on cuda, 0 on cpu
    precision: str = "auto"             # "bf16" autocast on cuda, "fp32" on cpu
    channels_last: bool = True
    compile: bool = False               # torch.compile the member
    checkpoint_every: int = 0           # also save last.pt every N steps inside an epoch (0: epoch ends)
    cache_dir: str | None = None        # decoded-crop cache; default: .alldetect-cache beside the manifest

    def __post_init__(self) -> None:
        from ..models import member_spec  # raises AlldetectError naming the known members
        from ..precision import TRAINING_PRECISIONS

        member_spec(self.member)
        for name, choices in (("optimizer", Optimizer), ("schedule", Schedule), ("augment", Augmentation),
                              ("augment_on", AugmentOn), ("sampling", Sampling),
                              ("colour", Colour)):
            object.__setattr__(self, name, choices.checked(getattr(self, name), name))  # plain strings in the JSON
        for name, allowed in (("precision", TRAINING_PRECISIONS), ("select_metric", tuple(SELECTION))):
            if getattr(self, name) not in allowed:
                raise AlldetectError(f"unknown {name} {getattr(self, name)!r}; choose one of {', '.join(allowed)}")
        if self.augment_on == AugmentOn.device and self.augment in HOST_AUGMENTATIONS:
            raise AlldetectError(f"augment {self.augment} runs one image at a time in the loader's workers "
                                 "(albumentations, on the host): choose augment_on auto or loader")
        for name in ("epochs", "batch_size", "crop"):
            if getattr(self, name) < 1:
                raise AlldetectError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("label_smoothing", "ema_decay"):
            if not 0 <= getattr(self, name) < 1:
                raise AlldetectError(f"{name} must be in [0, 1), got {getattr(self, name)}")

    @property
    def preprocess(self) -> Preprocess:
        return Preprocess(self.crop, self.input_size, self.colour)


DEMO_CROP = 80  # of the built-in synthetic 112 px frames: the paper's 450 -> 300 proportion; InceptionResNet-V2
                # needs 75
PROFILES: dict[Profile, dict] = {
    Profile.paper: {},
    Profile.demo: {"crop": DEMO_CROP, "epochs": 4, "batch_size": 16, "clr_step_epochs": 1, "pretrained": False},
    # Measured on real cells of unseen donors (benchmarks/cross_subject.py, BENCHMARKS.md): a cyclic peak of
    # 2e-3 wipes out ImageNet features and BA at 0.5 on one healthy validation donor picks epochs by chance.
    # 12 epochs rather than 8: on donors of other batches every member gained 0.07-0.13 cell AUC
    # (benchmarks/cross_batch.py), though inside one batch it gave nothing. Donors sampled alike and each cell's
    # colour centred on its own mean: leaving each of four batches out in turn (benchmarks/leave_one_batch_out.py,
    # 36 donors, its cheap variant) they took the pooled cell AUC from 0.40 to 0.77 and the donors called right
    # from 18 to 27; on the full CPU recipe with fold_1 held out, from 0.74 to 0.88 and from 6 to 13 of 14; pooled
    # over both batch turns of the full recipe, cell AUC 0.86 and 30 of 36 donors (BENCHMARKS.md). Standardising
    # instead of centring tied it there (0.86, 30 of 36).
    Profile.plus: {"optimizer": "adamw", "lr": 1e-4, "weight_decay": 0.05, "schedule": "cosine",
                   "warmup_epochs": 1.0, "label_smoothing": 0.1, "augment": "dihedral", "epochs": 12,
                   "select_metric": "last", "sampling": "donors", "colour": "centre"},
}


@dataclass(frozen=True)
class Recipe:
    """What `alldetect run` trains when the user leaves it open, for a kind of data and machine: a profile, a set
    of members (``models.members.MEMBER_SETS``), the input side and the cross-fit's folds (None: the profile's)."""
    profile: Profile
    members: str
    input_size: int | None = None
    folds: int | None = None
    minutes: int | None = None  # what it takes on 2 CPU cores, for the message that names the choice


RECIPES: dict[str, Recipe] = {
    "synthetic": Recipe(Profile.demo, "paper"),  # the built-in cells, whatever the machine
    "gpu": Recipe(Profile.plus, "paper"),        # real cells: the paper's five networks at 300 px
    # Real cells without a GPU: the three members whose ImageNet weights ship in pip packages, 300 px crops
    # resized to 96 px, which trains 1.7 times faster than 128. Inside one batch 96 px generalised better than
    # 128 (cell AUC 0.851 against 0.833); on donors of other batches 128 did better (0.697 against 0.601 for
    # refit members, BENCHMARKS.md) but would take the CPU run past its time budget. 3 folds keep about 1,500
    # cells within it on 2 cores (more folds train each model on more donors): the 1,521 cells of 36 donors took
    # 50 min 20 s on a 2-core AVX2 machine (BENCHMARKS.md).
    "cpu": Recipe(Profile.plus, "lite", input_size=96, folds=3, minutes=50),
}


def profile_config(profile: Profile | str, **overrides) -> TrainConfig:
    """The named profile's config with ``overrides`` (None values are ignored: the profile's value holds)."""
    try:
        profile = Profile(profile)
    except ValueError:
        raise AlldetectError(f"unknown profile {profile!r}; known: {', '.join(p.value for p in Profile)}") from None
    known = {f.name for f in fields(TrainConfig)}
    unknown = set(overrides) - known
    if unknown:
        raise AlldetectError(f"unknown config field(s): {', '.join(sorted(unknown))}")
    return replace(TrainConfig(**PROFILES[profile]), **{k: v for k, v in overrides.items() if v is not None})


def resumed_config(cfg: TrainConfig, saved: dict) -> TrainConfig:
    """The checkpoint's config (``saved``) wins for everything that shapes the result; only the machinery and
    the location fields come from ``cfg``."""
    saved = dict(saved, betas=tuple(saved["betas"]))
    if isinstance(saved.get("augment"), bool):  # runs from before augmentation had names
        saved["augment"] = "paper" if saved["augment"] else "none"
    return replace(TrainConfig(**saved), **{k: getattr(cfg, k) for k in MACHINERY | LOCATION})
