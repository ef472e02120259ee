"""The diagnosis rules on made-up curves: each finding where it holds, and none where it does not."""

from __future__ import annotations

import math

from launcher.diagnosis import Curves, diagnose


def kinds(c: Curves) -> list[str]:
    return [f.kind for f in diagnose(c)]


def falling(n: int = 50, start: float = 1.4, end: float = 0.2, every: int = 10) -> list[tuple[int, float]]:
    """A loss falling exponentially from `start` towards `end`, with a little deterministic noise."""
    return [((i + 1) * every, end + (start - end) * math.exp(-5 * i / n) + 0.01 * math.sin(i * 1.7)) for i in range(n)]


def test_a_healthy_run_has_no_finding():
    train = falling()
    val = [(s, v + 0.05) for s, v in train[4::5]]
    assert kinds(Curves(train_loss=train, val_loss=val, grad_norm=[(s, 0.5) for s, _ in train])) == []


def test_too_few_points_claim_nothing():
    assert kinds(Curves(train_loss=[(1, 1.4), (2, 1.4), (3, 1.4)])) == []


def test_a_flat_loss_is_underfitting_with_a_learning_rate_too_low():
    flat = [(s, 1.38 - 0.0001 * s / 10) for s in range(10, 510, 10)]
    found = diagnose(Curves(train_loss=flat, val_loss=[(250, 1.39), (500, 1.39)], lr=[(10, 1e-6)]))
    assert [f.kind for f in found] == ["underfitting", "lr_too_low"]
    assert "fell only 0%" in found[0].evidence[0] and "flattened" in found[0].evidence[-1]
    assert "lr 1e-06" in found[1].evidence[0]


def test_a_loss_still_falling_but_still_high_underfits_and_says_train_longer():
    slow = [(s, 1.4 - 0.3 * s / 500) for s in range(10, 510, 10)]
    found = diagnose(Curves(train_loss=slow))
    assert [f.kind for f in found] == ["underfitting"]
    assert found[0].suggestions[0].startswith("train longer")


def test_validation_rising_while_training_falls_is_overfitting_with_the_best_step():
    train = falling(end=0.01)
    val = [(100, 0.9), (200, 0.8), (300, 0.85), (400, 0.95), (500, 1.1)]
    found = diagnose(Curves(train_loss=train, val_loss=val))
    assert [f.kind for f in found] == ["overfitting"]
    assert "val/loss rose 0.85 -> 1.1" in found[0].evidence[0]
    assert "best at step 200: 0.8" in found[0].evidence[2]


def test_validation_noise_near_its_best_is_not_overfitting():
    train = falling()
    val = [(100, 0.9), (200, 0.8), (300, 0.79), (400, 0.795), (500, 0.80)]
    assert kinds(Curves(train_loss=train, val_loss=val)) == []


def test_skipped_steps_are_divergence():
    found = diagnose(Curves(train_loss=falling(), skipped_steps=3, stop_reason="diverged"))
    assert [f.kind for f in found] == ["divergence"]
    assert any("3 update(s) skipped" in e for e in found[0].evidence)


def test_a_loss_that_ends_above_its_start_is_divergence_and_a_learning_rate_too_high():
    rising = [(s, 1.4 + s / 100) for s in range(10, 510, 10)]
    assert kinds(Curves(train_loss=rising, val_loss=[(250, 5.0), (500, 9.0)])) == ["divergence", "lr_too_high"]


def test_a_spike_above_the_start_after_the_loss_fell_is_divergence():
    train = falling()
    train[30] = (train[30][0], 3.0)
    found = diagnose(Curves(train_loss=train))
    assert [f.kind for f in found] == ["divergence"]
    assert f"first at step {train[30][0]}" in found[0].evidence[0]


def test_a_small_loss_bouncing_is_not_a_spike():
    train = falling(end=0.01)
    train[40] = (train[40][0], train[39][1] * 5)  # 5x, but far below where the loss started
    assert kinds(Curves(train_loss=train)) == []


def test_an_exploding_gradient_norm_is_divergence():
    norms = [(s, 0.5 * 1.2 ** (s / 10)) for s in range(10, 510, 10)]
    assert kinds(Curves(train_loss=falling(), grad_norm=norms)) == ["divergence"]


def test_clipping_at_nearly_every_step_is_instability():
    norms = [(s, 3.0) for s, _ in falling()]
    found = diagnose(Curves(train_loss=falling(), grad_norm=norms, clip_grad_norm=1.0))
    assert [f.kind for f in found] == ["divergence"]
    assert "above clip_grad_norm=1 at 100%" in found[0].evidence[0]
    assert kinds(Curves(train_loss=falling(), grad_norm=norms, clip_grad_norm=None)) == []
