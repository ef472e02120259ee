"""Learning-rate schedules as pure functions of the optimizer step.

Each returns the factor that multiplies the optimizer's base `lr` for the update numbered `step` (0-based: the
update the logs and `launcher plan` call `step + 1`), so the schedule can be tested, plotted and resumed without an
optimizer. `build` adds an optional linear warm-up. docs/recipes.md gives each formula in the logs' numbering.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable


def constant(step: int, *, total_steps: int) -> float:
    return 1.0


def cosine(step: int, *, total_steps: int, min_ratio: float = 0.0) -> float:
    """Half a cosine from 1 down to `min_ratio` at `total_steps`, then flat."""
    progress = min(step / max(total_steps, 1), 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def linear(step: int, *, total_steps: int, min_ratio: float = 0.0) -> float:
    """A straight line from 1 down to `min_ratio` at `total_steps`, then flat."""
    progress = min(step / max(total_steps, 1), 1.0)
    return 1.0 - (1.0 - min_ratio) * progress


def exponential(step: int, *, total_steps: int, gamma: float = 0.999) -> float:
    """Multiplied by `gamma` after every step."""
    return gamma**step


def step_decay(step: int, *, total_steps: int, step_size: int, gamma: float = 0.1) -> float:
    """Multiplied by `gamma` every `step_size` steps."""
    return gamma ** (step // step_size)


def cyclic(
    step: int, *, total_steps: int, step_size_up: int, step_size_down: int | None = None, base_ratio: float = 0.1
) -> float:
    """Triangular cycles between `base_ratio` and 1: up in `step_size_up` steps, down in `step_size_down`."""
    down = step_size_up if step_size_down is None else step_size_down
    position = step % (step_size_up + down)
    rise = position / step_size_up if position < step_size_up else 1.0 - (position - step_size_up) / down
    return base_ratio + (1.0 - base_ratio) * rise


def onecycle(
    step: int,
    *,
    total_steps: int,
    pct_start: float = 0.3,
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
) -> float:
    """Smith's one-cycle: cosine up from 1/div_factor to 1 over pct_start of the run, then cosine down to
    1/(div_factor*final_div_factor), as torch's OneCycleLR with anneal_strategy='cos'."""
    start, low = 1.0 / div_factor, 1.0 / (div_factor * final_div_factor)
    # The phase boundaries as torch places them: the peak at step pct_start * total_steps - 1.
    peak = pct_start * total_steps - 1
    if peak > 0 and step <= peak:
        return _cos_between(start, 1.0, step / peak)
    rise = max(peak, 0.0)
    return _cos_between(1.0, low, min((step - rise) / max(total_steps - 1 - rise, 1e-12), 1.0))


def _cos_between(a: float, b: float, t: float) -> float:
    return b + (a - b) * 0.5 * (1.0 + math.cos(math.pi * t))


SCHEDULES: dict[str, Callable[..., float]] = {
    "constant": constant,
    "cosine": cosine,
    "linear": linear,
    "exponential": exponential,
    "step": step_decay,
    "cyclic": cyclic,
    "onecycle": onecycle,
}
# Schedules that shape their own start and must not be given another warm-up.
OWN_WARMUP = {"onecycle", "cyclic"}


# How the warm-up's first update starts: `nonzero` (the default, as every release before had it) one step of the
# ramp up, `zero` at 0 as the Hugging Face Trainer's (transformers') schedules; both reach the schedule's start at
# the update after the warm-up.
WARMUP_STARTS = ("nonzero", "zero")
# The keys a built-in schedule's section takes beside the schedule's own arguments (see `build`).
WARMUP_KEYS = ("warmup_steps", "warmup_start")


def with_warmup(step: int, *, warmup_steps: int, schedule: Callable[[int], float], start: str = "nonzero") -> float:
    """Linear warm-up to the schedule's start over `warmup_steps`, then the schedule shifted by the warm-up.
    `start`: one of `WARMUP_STARTS`."""
    if step < warmup_steps:
        ramp = step / warmup_steps if start == "zero" else (step + 1) / (warmup_steps + 1)
        return ramp * schedule(0)
    return schedule(step - warmup_steps)


def build(
    name: str, total_steps: int, warmup_steps: int = 0, warmup_start: str = "nonzero", **kwargs: float
) -> Callable[[int], float]:
    """The factor-of-step function for a built-in schedule; the decay spans the steps after the warm-up."""
    schedule = functools.partial(SCHEDULES[name], total_steps=max(total_steps - warmup_steps, 1), **kwargs)
    if warmup_steps == 0:
        return schedule
    return functools.partial(with_warmup, warmup_steps=warmup_steps, schedule=schedule, start=warmup_start)
