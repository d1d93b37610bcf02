"""Registry of members: a short name, the timm architecture, where Grad-CAM looks, where weights come from."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .. import _torchvision  # noqa: F401  (first: lets torchvision import beside a CPU-only torch)
import timm  # noqa: E402

from ..choices import Colour
from ..data.transforms import normalize
from ..errors import AlldetectError, first_line

logger = logging.getLogger(__name__)
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


class WeightsUnavailable(AlldetectError):
    """ImageNet weights were asked for and cannot be had."""


@dataclass(frozen=True)
class MemberSpec:
    name: str                  # our short name, e.g. "xception"
    timm_name: str             # the timm architecture, e.g. "legacy_xception"
    cam_layer: str             # dotted path (inside the timm model) of the Grad-CAM target layer
    paper: bool = True         # one of the paper's five networks
    # Loads ImageNet weights without the hub (e.g. from a pip package); None: hub or a local file only.
    offline_weights: Callable[[nn.Module], None] | None = None


_REGISTRY: dict[str, MemberSpec] = {}


def register_member(spec: MemberSpec) -> MemberSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"member {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def list_members(*, paper_only: bool = False) -> list[str]:
    return [n for n, s in _REGISTRY.items() if s.paper or not paper_only]


def member_spec(name: str) -> MemberSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise AlldetectError(f"unknown member {name!r}; known: {', '.join(list_members())}") from None


class Member(nn.Module):
    """A timm network that takes uint8 (or [0, 1] float) NCHW images and normalises them with its own
    ImageNet mean/std or each cell's own colour (``colour``, a ``choices.Colour``), so every member eats the same
    batch and the exported graph needs no preprocessing."""

    def __init__(self, name: str, net: nn.Module, colour: str = Colour.imagenet.value):
        super().__init__()
        self.name = name
        self.net = net
        self.colour = colour
        cfg = net.pretrained_cfg
        self.register_buffer("mean", torch.tensor(cfg["mean"], dtype=torch.float32), persistent=True)
        self.register_buffer("std", torch.tensor(cfg["std"], dtype=torch.float32), persistent=True)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(normalize(images, self.mean, self.std, self.colour))

    @property
    def cam_layers(self) -> list[nn.Module]:
        """Where Grad-CAM looks (a list, as for a member made of several fold models)."""
        return [self.net.get_submodule(member_spec(self.name).cam_layer)]


def create_member(name: str, *, pretrained: bool = False, weights: str | Path | None = None,
                  num_classes: int = 2, colour: str = Colour.imagenet.value) -> Member:
    """Build a member with a ``num_classes`` head that sets each cell's colour as ``colour`` says.

    Weights, in order: ``weights`` (a local ImageNet file, or a folder holding one named after the timm
    architecture); else with ``pretrained`` the member's offline source if it has one, else the hub;
    else random initialisation. Raises ``WeightsUnavailable`` with what to do when weights cannot be had.
    """
    spec = member_spec(name)
    if weights is not None:
        file = _find_weights_file(spec, Path(weights))
        logger.info("%s: ImageNet weights from %s", name, file)
        try:
            net = timm.create_model(spec.timm_name, pretrained=True, num_classes=num_classes,
                                    pretrained_cfg_overlay={"file": str(file)})
        except (RuntimeError, ValueError, OSError) as e:
            raise WeightsUnavailable(f"{file}: not usable ImageNet weights for {spec.timm_name} "
                                     f"({type(e).__name__}: {first_line(e)})") from None
    elif pretrained and spec.offline_weights is not None:
        net = timm.create_model(spec.timm_name, pretrained=False, num_classes=1000)
        spec.offline_weights(net)
        if num_classes != 1000:
            net.reset_classifier(num_classes)
    elif pretrained:
        if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
            raise WeightsUnavailable(
                f"ImageNet weights for {name} ({spec.timm_name}) need the hub, but HF_HUB_OFFLINE is set; "
                "pass --weights FILE or --weights-dir DIR with a local copy, or --no-pretrained")
        try:
            net = timm.create_model(spec.timm_name, pretrained=True, num_classes=num_classes)
        except Exception as e:  # the hub fails in many ways offline (OSError, HTTP errors, hub-specific ones)
            raise WeightsUnavailable(
                f"ImageNet weights for {name} ({spec.timm_name}) could not be downloaded "
                f"({type(e).__name__}: {first_line(e)}); pass --weights FILE or --weights-dir DIR with a local copy, "
                "or --no-pretrained") from None
    else:
        net = timm.create_model(spec.timm_name, pretrained=False, num_classes=num_classes)
    return Member(name, net, colour)


def _find_weights_file(spec: MemberSpec, path: Path) -> Path:
    if "\0" in str(path):
        raise WeightsUnavailable(f"{str(path)!r}: not a usable path (it holds a NUL byte)")
    if path.is_file():
        return path
    if path.is_dir():
        candidates = sorted(p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES
                            and p.name.startswith((spec.timm_name, spec.name)))
        if candidates:
            return candidates[0]
        raise WeightsUnavailable(f"{path}: no weights file for {spec.name} (expected a name starting with "
                                 f"{spec.timm_name!r} or {spec.name!r} ending in {', '.join(WEIGHT_SUFFIXES)})")
    raise WeightsUnavailable(f"{path}: weights file or folder not found")
