"""What a run's curves say is wrong with it, in plain words, each finding with the numbers behind it.

Pure functions over the logged values (`Curves`): no files, no torch, so every rule is tested on made-up curves.
The rules are deliberately conservative (a finding is a claim a user may act on) and each looks at the shape of
the run as a whole rather than at single noisy values:

- divergence: non-finite steps, a stop for divergence, the loss ending above where it started, spikes above the
  starting level after it had fallen, the gradient norm growing tenfold, or clipping at nearly every step;
- learning rate too high: the loss ending above where it started;
- overfitting: over the last evaluations validation loss rises while training loss falls;
- underfitting: training loss still above half its starting value (and validation no better);
- learning rate too low: the loss barely moving at all.
Underfitting and a low learning rate are not claimed of a run that diverges, nor overfitting of one whose
training itself is unstable: there the instability is the finding.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

Point = tuple[int, float]  # (step, value)

EVALS_FOR_OVERFITTING = 3  # validation must rise over at least this many of the last evaluations
MIN_TRAIN_POINTS = 5  # fewer logged training losses than this: too little to judge a trend
UNDERFIT_PROGRESS = 0.5  # training loss fell by less than this share of its starting value
LOW_LR_PROGRESS = 0.05  # ... by less than this: it barely moved
RISE = 1.1  # the loss ending above its start by this factor
SPIKE = 3.0  # a value this many times the median of the values before it, and above the starting level
GRAD_GROWTH = 10.0  # the gradient norm of the last quarter against the first quarter
CLIPPED_SHARE = 0.9  # share of logged steps whose norm was above clip_grad_norm
MIN_CLIP_POINTS = 10


@dataclass(frozen=True)
class Curves:
    """One run's logged values against step, finite values only (non-finite ones are counted in `skipped`)."""

    train_loss: Sequence[Point] = ()
    val_loss: Sequence[Point] = ()
    lr: Sequence[Point] = ()
    grad_norm: Sequence[Point] = ()
    skipped_steps: int = 0  # updates skipped for a non-finite loss or gradient norm
    nonfinite_grad_norms: int = 0  # logged gradient norms that were not finite
    stop_reason: str = ""
    clip_grad_norm: float | None = None


@dataclass(frozen=True)
class Finding:
    kind: str  # divergence, lr_too_high, overfitting, underfitting, lr_too_low
    title: str
    evidence: tuple[str, ...]
    suggestions: tuple[str, ...] = field(default_factory=tuple)


def diagnose(c: Curves) -> list[Finding]:
    """The findings for one run, the most severe first; none for a healthy run."""
    findings: list[Finding] = []
    diverged = divergence(c)
    if diverged:
        findings.append(diverged)
    too_high = lr_too_high(c)
    if too_high:
        findings.append(too_high)
    unstable = bool(diverged or too_high)
    if not unstable:
        over = overfitting(c)
        if over:
            findings.append(over)
        else:
            findings.extend(f for f in (underfitting(c), lr_too_low(c)) if f)
    return findings


def divergence(c: Curves) -> Finding | None:
    evidence = []
    if c.stop_reason == "diverged":
        evidence.append("the run stopped itself: too many updates in a row had a non-finite loss or gradient norm")
    if c.skipped_steps:
        evidence.append(f"{c.skipped_steps} update(s) skipped for a non-finite loss or gradient norm")
    elif c.nonfinite_grad_norms:
        evidence.append(f"{c.nonfinite_grad_norms} logged gradient norm(s) were not finite")
    levels = _levels(c)
    if levels:
        start, end = levels
        if end > start * RISE:
            evidence.append(f"train loss ended above where it started: {start:.4g} -> {end:.4g}")
        spikes = _spikes(c.train_loss, start)
        if spikes:
            step, value, before = spikes[0]
            evidence.append(
                f"{len(spikes)} loss spike(s) to {SPIKE:g}x or more the median of the values before them and above "
                f"the starting level, the first at step {step}: {value:.4g} against {before:.4g}"
            )
    norms = [v for _, v in c.grad_norm]
    if len(norms) >= 8:
        quarter = max(1, len(norms) // 4)
        early, late = statistics.median(norms[:quarter]), statistics.median(norms[-quarter:])
        if early > 0 and late > early * GRAD_GROWTH:
            evidence.append(f"the gradient norm grew {late / early:.0f}x: median {early:.3g} early, {late:.3g} late")
    if c.clip_grad_norm and len(norms) >= MIN_CLIP_POINTS:
        share = sum(n > c.clip_grad_norm for n in norms) / len(norms)
        if share >= CLIPPED_SHARE:
            evidence.append(
                f"the gradient norm was above clip_grad_norm={c.clip_grad_norm:g} at {share:.0%} of the logged "
                f"steps (median {statistics.median(norms):.3g}): clipping, not the learning rate, set the step size"
            )
    if not evidence:
        return None
    return Finding(
        "divergence",
        "Training is unstable (divergence)",
        tuple(evidence),
        (
            "lower the learning rate (optimizer.lr), by 3-10x",
            "warm it up (scheduler.warmup_steps, e.g. 5% of the steps)",
            "clip the gradient norm (train.clip_grad_norm: 1.0)",
            "with fp16, prefer bf16 where the hardware has it",
        ),
    )


def lr_too_high(c: Curves) -> Finding | None:
    levels = _levels(c)
    if levels is None:
        return None
    start, end = levels
    if end <= start * RISE:
        return None
    return Finding(
        "lr_too_high",
        "The learning rate is likely too high",
        (f"training made the loss worse: {start:.4g} at the start, {end:.4g} at the end{_lr_text(c)}",),
        ("lower optimizer.lr by 3-10x", "add warmup (scheduler.warmup_steps)"),
    )


def overfitting(c: Curves) -> Finding | None:
    val = list(c.val_loss)
    if len(val) < EVALS_FOR_OVERFITTING or len(c.train_loss) < 2:
        return None
    best_step, best = min(val, key=lambda p: (p[1], p[0]))
    window = val[-EVALS_FOR_OVERFITTING:]
    (first_step, first), (last_step, last) = window[0], window[-1]
    rising = last > first and last > best * 1.05 and best_step < last_step
    rises = sum(b[1] > a[1] for a, b in itertools.pairwise(window))
    if not rising or rises < len(window) - 2:  # mostly rising, one dip allowed
        return None
    train_then, train_now = _at(c.train_loss, first_step), _at(c.train_loss, last_step)
    if train_then is None or train_now is None or train_now >= train_then:
        return None
    return Finding(
        "overfitting",
        "The model overfits",
        (
            f"over the last {len(window)} evaluations val/loss rose {first:.4g} -> {last:.4g} (steps {first_step} "
            f"-> {last_step}) while train/loss fell {train_then:.4g} -> {train_now:.4g}",
            f"gap at the end: val/loss - train/loss = {last - train_now:.4g}",
            f"val/loss was best at step {best_step}: {best:.4g}",
        ),
        (
            "regularise: weight decay (optimizer.weight_decay), dropout",
            "more data or data augmentation",
            "a smaller model",
            f"stop early (early_stopping: {{monitor: val/loss, patience: 3}}) and keep the best checkpoint "
            f"(checkpoint.keep_best: 1, the one from step {best_step} here)",
        ),
    )


def underfitting(c: Curves) -> Finding | None:
    levels = _levels(c)
    if levels is None:
        return None
    start, end = levels
    if start <= 0 or (start - end) / start >= UNDERFIT_PROGRESS:
        return None
    moved = f"fell only {_share(start, end)}" if end < start else "did not fall"
    evidence = [f"train/loss {moved}: {start:.4g} -> {end:.4g}"]
    if c.val_loss:
        step, val = c.val_loss[-1]
        train = _at(c.train_loss, step)
        gap = f" ({val - train:+.3g} against train/loss there: no better on what it trained on)" if train else ""
        evidence.append(f"val/loss at the last evaluation: {val:.4g}{gap}")
    still_falling = _still_falling([v for _, v in c.train_loss])
    suggestions = ["a larger model (more layers or width)", "a higher learning rate (optimizer.lr)"]
    if still_falling:
        evidence.append("it was still falling when the run ended")
        suggestions.insert(0, "train longer (train.max_steps / train.max_epochs)")
    else:
        evidence.append("it had flattened out by the end")
    return Finding("underfitting", "The model underfits", tuple(evidence), tuple(suggestions))


def lr_too_low(c: Curves) -> Finding | None:
    levels = _levels(c)
    if levels is None:
        return None
    start, end = levels
    if start <= 0 or abs(start - end) / start >= LOW_LR_PROGRESS:
        return None
    steps = c.train_loss[-1][0] - c.train_loss[0][0]
    return Finding(
        "lr_too_low",
        "The learning rate is likely too low",
        (f"the loss barely moved: {start:.4g} -> {end:.4g} in {steps} steps{_lr_text(c)}",),
        ("raise optimizer.lr by 10x (or run a short sweep)",),
    )


def _levels(c: Curves) -> tuple[float, float] | None:
    """Train/loss at the start and at the end (`_head`, `_tail`); None where too few were logged to judge."""
    values = [v for _, v in c.train_loss]
    if len(values) < MIN_TRAIN_POINTS:
        return None
    return _head(values), _tail(values)


def _head(values: Sequence[float]) -> float:
    """The starting level: the median of the first three values (fewer in a run of fewer than 30), close to the
    start however long the run."""
    return statistics.median(values[: min(3, max(1, len(values) // 10))])


def _tail(values: Sequence[float]) -> float:
    return statistics.median(values[-min(10, max(1, len(values) // 10)) :])


def _spikes(points: Sequence[Point], start: float) -> list[tuple[int, float, float]]:
    """(step, value, median of the 10 values before) of values SPIKE times above that median and above `start`."""
    out = []
    values = [v for _, v in points]
    for i in range(max(3, len(values) // 10), len(values)):
        before = statistics.median(values[max(0, i - 10) : i])
        if values[i] > before * SPIKE and values[i] > start and before < start:
            out.append((points[i][0], values[i], before))
    return out


def _still_falling(values: Sequence[float]) -> bool:
    """Whether the last quarter fell by more than 2% of its level (median of its first half against its last)."""
    quarter = values[-max(4, len(values) // 4) :]
    half = len(quarter) // 2
    a, b = statistics.median(quarter[:half]), statistics.median(quarter[half:])
    return a > 0 and (a - b) / a > 0.02


def _at(points: Sequence[Point], step: int) -> float | None:
    """The median of the (up to 5) values logged at or just before `step`."""
    before = [v for s, v in points if s <= step][-5:]
    return statistics.median(before) if before else None


def _share(start: float, end: float) -> str:
    return f"{(start - end) / start:.0%}" if start else "-"


def _lr_text(c: Curves) -> str:
    lrs = [v for _, v in c.lr if math.isfinite(v)]
    return f" (lr {max(lrs):.3g})" if lrs else ""
