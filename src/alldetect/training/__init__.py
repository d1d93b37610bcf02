"""The paper's training protocol (Sec. 2.2): ``fit(cfg)`` writes a resumable run directory."""

from .config import PROFILES, TrainConfig, profile_config
from .loop import fit

__all__ = ["PROFILES", "TrainConfig", "fit", "profile_config"]
