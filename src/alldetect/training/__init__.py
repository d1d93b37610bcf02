"""The paper's training protocol (Sec. 2.2): ``fit(cfg)`` writes a resumable run directory."""

from .config import PROFILES, TrainConfig, profile_config

__all__ = ["PROFILES", "TrainConfig", "fit", "profile_config"]


def __getattr__(name: str):
    """``fit`` is imported on first use: it pulls in torch, and the CLI reads profiles long before it trains."""
    if name == "fit":
        from .loop import fit

        return fit
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
