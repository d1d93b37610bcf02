"""Learning-rate schedules: the paper's cyclic ``triangular2`` (Smith 2017, Keras-CLR semantics) and warm-up +
cosine for fine-tuning pretrained networks."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable


def triangular2_lr(step: int, *, low: float, high: float, half_cycle: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based): a triangle from ``low`` up to ``high`` and back
    over ``2 * half_cycle`` steps, its height halved every cycle. Step 0 uses ``low``, as Keras' CLR callback.

    >>> [round(triangular2_lr(s, low=0.0, high=1.0, half_cycle=2), 3) for s in range(9)]
    [0.0, 0.5, 1.0, 0.5, 0.0, 0.25, 0.5, 0.25, 0.0]
    """
    if half_cycle <= 0:
        raise ValueError(f"half_cycle must be positive, got {half_cycle}")
    cycle = step // (2 * half_cycle)
    x = abs(step / half_cycle - 2 * cycle - 1)
    return low + (high - low) * max(0.0, 1 - x) / 2**cycle


def warmup_cosine_lr(step: int, *, peak: float, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up from ``peak / warmup_steps`` to ``peak`` over ``warmup_steps`` steps, then a half cosine
    down to 0 at ``total_steps`` (the usual fine-tuning schedule for pretrained networks).

    >>> [round(warmup_cosine_lr(s, peak=1.0, warmup_steps=2, total_steps=6), 3) for s in range(6)]
    [0.5, 1.0, 0.854, 0.5, 0.146, 0.0]
    """
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps + 1) / max(1, total_steps - warmup_steps))
    return peak * 0.5 * (1 + math.cos(math.pi * progress))


def learning_rate_schedule(cfg, steps_per_epoch: int) -> Callable[[int], float]:
    """The learning rate of every optimizer step for ``cfg`` (a ``TrainConfig``)."""
    if cfg.schedule == "cosine":
        warmup = round(cfg.warmup_epochs * steps_per_epoch)
        return functools.partial(warmup_cosine_lr, peak=cfg.lr, warmup_steps=warmup,
                                 total_steps=cfg.epochs * steps_per_epoch)
    return functools.partial(triangular2_lr, low=cfg.clr_low, high=cfg.clr_high,
                             half_cycle=cfg.clr_step_epochs * steps_per_epoch)
