"""Re-estimating a network's BatchNorm statistics on a site's own cells (AdaBN, Li et al. 2016), so that a stain
or illumination the training cells did not have is normalised as the training batches were.

What is re-estimated (``layers``): every BatchNorm layer, or only the early ones (the first third in the
network's order: stem and first stages, where colour and illumination live). ``site_weight`` mixes the two
estimates: 1 keeps the site's statistics, 0.5 the mean of the training and the site's.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from ..choices import AdaptLayers
from .folds import FoldAverage

ADAPT_BATCH = 64        # cells per forward pass: a fixed size, so the statistics do not depend on the caller's
EARLY_FRACTION = 1 / 3  # "early": the first third of a network's BatchNorm layers


def batchnorm_layers(model: nn.Module, layers: str) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers that ``layers`` names, in the network's order (none for a network without any)."""
    found = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if layers == AdaptLayers.early:
        return found[:math.ceil(len(found) * EARLY_FRACTION)]
    return found


@torch.no_grad()
def adapt_batchnorm(model: nn.Module, crops: np.ndarray, *, layers: str, site_weight: float) -> int:
    """Re-estimate ``model``'s chosen BatchNorm running statistics on uint8 crops (N, S, S, 3), in place, and mix
    them with the training ones by ``site_weight``. Deterministic: the cells go through in their order,
    ``ADAPT_BATCH`` at a time, each layer's statistics their cumulative average (``momentum=None``), as
    ``torch.optim.swa_utils.update_bn`` does for every layer. A member cross-fitted on K folds adapts each fold
    model alone. Returns how many layers were adapted."""
    if isinstance(model, FoldAverage):
        return sum(adapt_batchnorm(fold, crops, layers=layers, site_weight=site_weight) for fold in model.folds)
    chosen = batchnorm_layers(model, layers)
    if not chosen:
        return 0
    trained = [(bn.running_mean.clone(), bn.running_var.clone(), bn.momentum) for bn in chosen]
    was_training = model.training
    model.eval()
    for bn in chosen:  # only these see the site's batch statistics; every other layer stays as trained
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    device = next(model.parameters()).device
    for start in range(0, len(crops), ADAPT_BATCH):
        batch = torch.from_numpy(np.ascontiguousarray(crops[start:start + ADAPT_BATCH])).to(device)
        model(batch.permute(0, 3, 1, 2).contiguous())
    w = float(site_weight)
    for bn, (mean, var, momentum) in zip(chosen, trained):
        bn.running_mean.mul_(w).add_(mean, alpha=1 - w)
        bn.running_var.mul_(w).add_(var, alpha=1 - w)
        bn.momentum = momentum
    model.train(was_training)
    return len(chosen)
