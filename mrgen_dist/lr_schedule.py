"""The learning rate over a run (`optim.schedule`): `constant` (the method's), or `cosine`, a cosine decay from
`optim.lr` to `optim.min_lr_ratio` of it at the run's last optimizer step (nanoGPT's). Under either, an
optional linear warm-up of `optim.warmup_steps` comes first.

Why a decay: a short run at a constant rate ends where the last steps' noise leaves it; decaying the rate
over the run's own length settles the weights. The rate is a function of the optimizer step alone (and of the
run's length), so a resumed run takes the rates of an uninterrupted one from its restored step count.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

SCHEDULES = ("constant", "cosine")


def lr_factor(step: int, total_steps: int, schedule: str, warmup_steps: int, min_ratio: float) -> float:
    """The multiple of the base rate for optimizer step `step` (0 = the first) of a run of `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule != "cosine":
        raise ValueError(f"unknown learning-rate schedule {schedule!r}; one of {', '.join(SCHEDULES)}")
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - 1 - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def set_learning_rates(optimizers: Iterable[torch.optim.Optimizer], factor: float) -> None:
    """Every parameter group's rate = its base rate x `factor`. The base is kept in the group as
    `initial_lr` (as torch's schedulers keep it), so it is in the optimizer's state dict and a resumed run
    finds it there."""
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
            group["lr"] = group["initial_lr"] * factor
