from __future__ import annotations

import math

from launcher.early_stopping import Tracker


def run(values: list[float], mode: str = "min", patience: int = 2, min_delta: float = 0.0) -> int | None:
    """The index of the evaluation at which training stops, or None."""
    tracker = Tracker(mode=mode, min_delta=min_delta)
    for i, value in enumerate(values):
        tracker = tracker.update(value, step=i)
        if tracker.should_stop(patience):
            return i
    return None


def test_stops_after_patience_evaluations_without_improvement():
    assert run([1.0, 0.9, 0.95, 0.92], patience=2) == 3
    assert run([1.0, 0.9, 0.95, 0.85, 0.86], patience=2) is None  # the counter resets on improvement


def test_patience_zero_and_one_stop_at_the_first_bad_evaluation():
    assert run([1.0, 1.1], patience=0) == 1
    assert run([1.0, 1.1], patience=1) == 1
    assert run([1.0, 0.9, 0.8], patience=0) is None


def test_max_mode_and_min_delta():
    assert run([0.5, 0.6, 0.605, 0.609], mode="max", patience=2, min_delta=0.01) == 3
    assert run([0.5, 0.6, 0.7], mode="max", patience=1, min_delta=0.01) is None


def test_nan_never_improves_and_counts_as_bad():
    tracker = Tracker().update(1.0, 0).update(math.nan, 1)
    assert tracker.best == 1.0 and tracker.bad_evals == 1


def test_state_round_trips():
    tracker = Tracker(mode="max", min_delta=0.1).update(3.0, 7).update(2.0, 8)
    assert Tracker.from_state_dict(tracker.state_dict()) == tracker
    assert tracker.best_step == 7
