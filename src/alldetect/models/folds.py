"""A member cross-fitted on K folds of donors, shipped as the average of its K fold models."""

from __future__ import annotations

import torch
from torch import nn

from ._registry import Member


class FoldAverage(nn.Module):
    """K fold models of one member as one: P(ALL) is the mean of the K models' probabilities.

    ``forward`` returns log-probabilities, so ``softmax(forward(x))`` is that mean and the module stands in for
    a ``Member`` everywhere (scoring, TTA, the ONNX graph, Grad-CAM, where each fold model's map is averaged).
    """

    def __init__(self, folds: list[Member]):
        super().__init__()
        if len({m.name for m in folds}) != 1:
            raise ValueError(f"fold models of different members: {[m.name for m in folds]}")
        self.name = folds[0].name
        self.folds = nn.ModuleList(folds)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        probs = torch.stack([m(images).float().softmax(dim=1) for m in self.folds]).mean(dim=0)
        return probs.clamp_min(torch.finfo(torch.float32).tiny).log()

    @property
    def cam_layers(self) -> list[nn.Module]:
        return [layer for m in self.folds for layer in m.cam_layers]
