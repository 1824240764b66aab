"""Learning-rate and teacher-momentum schedules as pure functions of the global step.

Nothing here holds state: the trainer asks `lr_at(step, ...)` and `momentum_at(step, ...)` every
iteration, so resuming from a checkpoint only needs the step counter, and logging the value of any
step is a function call.
"""
from __future__ import annotations

import math

_LR_SCHEDULES = ("cosine", "constant")
_MOMENTUM_SCHEDULES = ("constant", "cosine")


def scaled_lr(base_lr: float, global_batch: int) -> float:
    """Linear scaling rule (Goyal et al.): recipes quote lr per 256 images, the run uses the real batch."""
    return base_lr * global_batch / 256


def run_length(epochs: int, warmup_epochs: float, class_fraction: float = 1.0,
               keep_iterations: bool = False) -> tuple[int, float]:
    """(epochs, warm-up epochs) of a run on `class_fraction` of the classes. With `keep_iterations`
    both grow by 1 / class_fraction: the run keeps the iterations of the full-data recipe, and its
    warm-up the same share of them (10 of 200 epochs stays 5 % of the steps)."""
    if not keep_iterations or class_fraction >= 1.0:
        return epochs, warmup_epochs
    longer = math.ceil(epochs / class_fraction)
    return longer, warmup_epochs * longer / epochs


def _cosine(progress: float) -> float:
    """Half-cosine from 1 (progress 0) to 0 (progress 1); progress is clamped so overruns stay at 0."""
    progress = min(max(progress, 0.0), 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_at(
    step: int,
    total_steps: int,
    warmup_steps: int,
    peak_lr: float,
    schedule: str = "cosine",
    min_lr: float = 0.0,
) -> float:
    """Learning rate of iteration `step` (0-based): linear warm-up to `peak_lr`, then cosine to `min_lr`.

    Warm-up uses (step + 1) / warmup_steps so the very first iteration already moves the weights
    (an lr of exactly 0 would waste a step and hide a broken optimiser in the first log line).
    The cosine runs over the steps after warm-up and reaches `min_lr` at `total_steps`.
    "constant" keeps `peak_lr` after warm-up (used by linear probes and debugging runs).
    """
    if schedule not in _LR_SCHEDULES:
        raise ValueError(f"optim.schedule={schedule!r} is unknown: use one of {_LR_SCHEDULES}")
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return peak_lr
    decay_steps = max(total_steps - warmup_steps, 1)
    return min_lr + (peak_lr - min_lr) * _cosine((step - warmup_steps) / decay_steps)


def momentum_at(step: int, total_steps: int, base: float, schedule: str = "cosine") -> float:
    """EMA-teacher momentum of iteration `step`.

    "constant" is MoCo's fixed m; "cosine" is BYOL's ramp m(k) = 1 - (1 - base)(cos(pi k / K) + 1) / 2,
    which starts at `base` and reaches 1 at k = K, so the teacher freezes as training ends.
    """
    if schedule not in _MOMENTUM_SCHEDULES:
        raise ValueError(
            f"method.ema.schedule={schedule!r} is unknown: use one of {_MOMENTUM_SCHEDULES}"
        )
    if schedule == "constant":
        return base
    return 1.0 - (1.0 - base) * _cosine(step / max(total_steps, 1))
