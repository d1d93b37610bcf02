"""Every training knob in one frozen config, with the paper's values as defaults."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace


@dataclass(frozen=True)
class TrainConfig:
    member: str = "densenet121"
    manifest: str = ""                  # manifest CSV with train/val (and optionally test) splits
    out: str = "runs/densenet121"       # run directory
    # data (paper Sec. 2.1.2)
    crop: int = 300                     # pixel-exact center crop of the 450x450 frame
    input_size: int | None = None       # resize after cropping; None feeds the crop itself (paper)
    oversample: bool = True             # replicate minority-class images up to the majority count
    augment: bool = True                # flips, rotation, zoom, shift
    # optimisation (paper Sec. 2.2)
    epochs: int = 12                    # one triangular2 cycle is 2 x 6 epochs: keep a multiple of 12
    batch_size: int = 32
    lr: float = 2e-4                    # Adamax initial lr; as in Keras CLR the schedule sets lr from step 0
    betas: tuple[float, float] = (0.9, 0.999)  # no momentum cycling: beta1 stays 0.9
    eps: float = 1e-7                   # Keras' Adamax epsilon
    clr_low: float = 1e-7               # triangular2 bounds
    clr_high: float = 2e-3
    clr_step_epochs: int = 6            # StepSize = 6 x iterations per epoch
    select_metric: str = "ba"           # validation metric that picks the best epoch (higher is better)
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
    cache_dir: str | None = None        # decoded-crop cache; default: <run>/../.cache


PROFILES: dict[str, dict] = {
    "paper": {},
    # minutes on a laptop CPU with the built-in synthetic set: small crops, few epochs, random init
    "demo": {"crop": 80, "epochs": 4, "batch_size": 16, "clr_step_epochs": 1, "pretrained": False},
}


def profile_config(profile: str, **overrides) -> TrainConfig:
    """The named profile's config with ``overrides`` (None values are ignored)."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; known: {', '.join(PROFILES)}")
    known = {f.name for f in fields(TrainConfig)}
    unknown = set(overrides) - known
    if unknown:
        raise ValueError(f"unknown config field(s): {', '.join(sorted(unknown))}")
    cfg = replace(TrainConfig(), **PROFILES[profile])
    return replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
