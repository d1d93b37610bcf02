"""Cyclic learning rate (Smith 2017), the ``triangular2`` policy with Keras-CLR semantics."""

from __future__ import annotations


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
