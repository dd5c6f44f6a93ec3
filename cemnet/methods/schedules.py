"""Learning-rate schedules of the pretraining methods, as pure functions of the (fractional) epoch."""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["lr_factor"]


def lr_factor(
    epoch: float,
    schedule: str,
    max_epochs: float,
    milestones: Sequence[float] = (),
    gamma: float = 0.1,
    warmup_epochs: float = 0.0,
) -> float:
    """Multiplier of the base learning rate at (fractional) ``epoch``.

    ``"step"``: ``gamma`` per milestone passed (CEM500K: x0.1 at 120 and 160 of 200, evaluated at
    whole epochs as their ``adjust_learning_rate``); ``"cosine"``: half cosine to 0 at ``max_epochs``
    (per step); ``"constant"``. A linear warm-up over ``warmup_epochs`` multiplies any of them.
    """
    if schedule == "step":
        f = gamma ** sum(math.floor(epoch) >= m for m in milestones)
    elif schedule == "cosine":
        f = 0.5 * (1.0 + math.cos(math.pi * min(epoch / max(max_epochs, 1e-12), 1.0)))
    elif schedule == "constant":
        f = 1.0
    else:
        raise ValueError(f"unknown schedule {schedule!r} (step, cosine, constant)")
    if warmup_epochs > 0 and epoch < warmup_epochs:
        f *= (epoch + 1e-12) / warmup_epochs
    return f
