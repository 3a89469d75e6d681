"""Learning-rate schedules: linear warmup, then cosine, linear or constant decay.

``step`` counts optimizer steps from 0: the first update is made at step 0, the next at step 1.
:func:`scheduler` is a ``LambdaLR``: it starts at ``lr_factor(0)`` and ``scheduler.step()``
after each ``optimizer.step()`` moves to the next step, so update ``k`` uses ``lr_factor(k)``.

- **Warmup** (torchtitan style): for ``step < warmup_steps`` the factor is
  ``(step + 1) / warmup_steps``, so the first update already moves (``1/warmup``, never 0) and
  the last warmup step (``warmup_steps - 1``) is at the peak, 1.0.
- **Decay** from 1.0 at ``step = warmup_steps`` to ``min_lr_ratio`` at ``step = max_steps``
  over ``progress = (step - warmup_steps) / (max_steps - warmup_steps)`` (clamped to [0, 1]):
  ``cosine``: ``min + (1 - min) * (1 + cos(pi * progress)) / 2``; ``linear``:
  ``min + (1 - min) * (1 - progress)``; ``constant``: 1.0 (``min_lr_ratio`` unused).
  Steps run ``0 .. max_steps - 1``, so the last update is one decay step above the floor.

Every parameter group keeps its own base lr (``optim.lr x lr_scale``, from layer-wise decay and
multipliers) and the schedule multiplies each by the same factor: ratios between groups hold at
every step.
"""

from __future__ import annotations

import math

from .recipe import ScheduleConfig


def lr_factor(step: int, sched: ScheduleConfig, max_steps: int) -> float:
    """The multiplier of every group's base lr at optimizer step ``step`` (0-based)."""
    warmup = max(0, int(sched.warmup_steps))
    if step < warmup:
        return (step + 1) / warmup
    if sched.name == "constant":
        return 1.0
    span = max_steps - warmup
    progress = 1.0 if span <= 0 else min(1.0, max(0.0, (step - warmup) / span))
    lo = float(sched.min_lr_ratio)
    if sched.name == "cosine":
        return lo + (1.0 - lo) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if sched.name == "linear":
        return lo + (1.0 - lo) * (1.0 - progress)
    raise ValueError(f"schedule.name: {sched.name!r} is not one of cosine, linear, constant")


def scheduler(optimizer, sched: ScheduleConfig, max_steps: int):
    """A ``LambdaLR`` whose group lrs are each group's base lr x :func:`lr_factor`.

    Construct it right after the optimizer (the group ``lr`` values are taken as the base, as
    ``initial_lr``); it sets the step-0 lr at once. It needs a torch optimizer: with DeepSpeed,
    pass ``lr_scheduler=lambda opt: scheduler(opt, sched, max_steps)`` to ``deepspeed.initialize``,
    which calls it with the client AdamW whose group dicts the ZeRO optimizer steps."""
    from torch.optim.lr_scheduler import LambdaLR

    if sched.name not in ("cosine", "linear", "constant"):
        raise ValueError(f"schedule.name: {sched.name!r} is not one of cosine, linear, constant")
    return LambdaLR(optimizer, lambda step: lr_factor(step, sched, max_steps))
