"""Early stopping as a small pure state machine, serialisable into checkpoints."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace


@dataclass(frozen=True)
class Tracker:
    """The best value seen of one metric and how many evaluations have passed without beating it."""

    mode: str = "min"  # "min" or "max"
    min_delta: float = 0.0
    best: float | None = None
    best_step: int | None = None
    bad_evals: int = 0

    def improved_by(self, value: float) -> bool:
        """Whether `value` beats the best by more than min_delta. NaN never improves."""
        if math.isnan(value):
            return False
        if self.best is None:
            return True
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def update(self, value: float, step: int) -> Tracker:
        if self.improved_by(value):
            return replace(self, best=value, best_step=step, bad_evals=0)
        return replace(self, bad_evals=self.bad_evals + 1)

    def should_stop(self, patience: int) -> bool:
        """Stop once `patience` evaluations in a row failed to improve (0 and 1 both stop at the first)."""
        return self.bad_evals >= max(patience, 1)

    def state_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state_dict(cls, state: dict) -> Tracker:
        return cls(**state)
