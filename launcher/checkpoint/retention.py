"""Which checkpoints a run has and keeps: the latest, the best, the intact, those a crash left unfinished, and those
retention removes."""

from __future__ import annotations

import math
import shutil
from collections.abc import Sequence
from pathlib import Path

from launcher.checkpoint import integrity
from launcher.layout import (
    BEST,
    LATEST,
    PRUNED_PREFIX,
    STATE_FILE,
    STEP_DIR,
    complete_steps,
    is_complete,
    is_interrupted_name,
    pruned_dir,
    read_json,
    step_dir_name,
)


def latest(ckpt_dir: Path) -> Path | None:
    steps = complete_steps(ckpt_dir)
    return ckpt_dir / step_dir_name(steps[-1]) if steps else None


def latest_intact(ckpt_dir: Path) -> tuple[Path | None, list[str]]:
    """The newest complete checkpoint that is intact, and a line (`<path>: damaged: <problem>`) for each newer one
    passed over. Every rank of a launch calls this on the same files and so picks the same checkpoint."""
    passed_over = []
    for step in reversed(complete_steps(ckpt_dir)):
        path = ckpt_dir / step_dir_name(step)
        problem = integrity.problems(path)
        if problem is None:
            return path, passed_over
        passed_over.append(f"{path}: damaged: {problem}")
    return None, passed_over


def interrupted(path: Path) -> bool:
    """A save that did not finish: no trainer state yet, or still (or again) under a temporary name, which a crash
    just before the final rename leaves holding a trainer state."""
    return not is_complete(path) or is_interrupted_name(path.name)


def retained(steps: Sequence[int], keep_last: int, best: Sequence[Sequence[float]] = ()) -> set[int]:
    """The step checkpoints retention keeps: the newest `keep_last`, and those listed in `best` ([step, metric]
    pairs, the run's `keep_best` best so far)."""
    newest = sorted(steps)[-keep_last:] if keep_last else []
    return set(newest) | {int(step) for step, _ in best if int(step) in steps}


def to_delete(steps: Sequence[int], keep_last: int, best: Sequence[Sequence[float]] = ()) -> list[int]:
    """Which of these step checkpoints retention removes."""
    keep = retained(steps, keep_last, best)
    return sorted(s for s in steps if s not in keep)


def rank_best(best: Sequence[Sequence[float]], step: int, value: float, keep_best: int, mode: str) -> list[list[float]]:
    """The `keep_best` best [step, metric] pairs once `value` at `step` is counted (ties go to the older)."""
    if math.isnan(value):
        return [list(b) for b in best]
    pairs = sorted([*([list(b) for b in best]), [step, value]], key=lambda b: (b[1] if mode == "min" else -b[1], b[0]))
    return pairs[:keep_best]


def best(ckpt_dir: Path) -> Path | None:
    """The complete checkpoint with the best recorded metric, by the mode it was recorded with."""
    # A trainer state that does not parse has no metric: the checkpoint is refused when it is used.
    states = {step: read_json(ckpt_dir / step_dir_name(step) / STATE_FILE) for step in complete_steps(ckpt_dir)}
    step = best_step(states)
    return None if step is None else ckpt_dir / step_dir_name(step)


def best_step(states: dict[int, dict]) -> int | None:
    """The step whose trainer state records the best metric, by the mode it was recorded with (ties go to the
    older); None where none records one."""
    scored = []
    for step, state in states.items():
        monitor = state.get("monitor") or {}
        if isinstance(monitor, dict) and monitor.get("value") is not None:
            sign = 1 if monitor.get("mode", "min") == "min" else -1
            scored.append((sign * monitor["value"], step))
    return min(scored)[1] if scored else None


def resolve(path: Path) -> Path:
    """`.../checkpoints/latest` and `.../checkpoints/best` name checkpoints without links that a shared file
    system might break: they are looked up here."""
    if path.exists() or path.name not in (LATEST, BEST):
        return path
    found = latest(path.parent) if path.name == LATEST else best(path.parent)
    return found if found is not None else path


def incomplete(ckpt_dir: Path) -> list[Path]:
    """Checkpoint directories a crash left unfinished: ignored on resume, worth a warning."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(
        child
        for child in ckpt_dir.iterdir()
        if child.is_dir()
        and (is_interrupted_name(child.name) or (STEP_DIR.match(child.name) and not is_complete(child)))
    )


def prune(ckpt_dir: Path, keep_last: int, best: Sequence[Sequence[float]] = ()) -> None:
    """Retention, run by the main process alone, among complete checkpoints only.

    Each checkpoint is renamed to a hidden `.pruned-` name before anything in it is deleted: the rename is atomic,
    so a kill during the deletion leaves no `step_` directory with files missing (which would read as damaged),
    only a hidden one that `finish_pruning` removes at the next start or save."""
    finish_pruning(ckpt_dir)
    for step in to_delete(complete_steps(ckpt_dir), keep_last, best):
        path = ckpt_dir / step_dir_name(step)
        doomed = pruned_dir(path)
        try:
            path.rename(doomed)
        except OSError:  # a file system that refuses the rename: deleted in place, as before
            shutil.rmtree(path, ignore_errors=True)
            continue
        _delete(doomed)


def finish_pruning(ckpt_dir: Path) -> None:
    """Delete what a kill during retention left (`.pruned-` directories)."""
    if not ckpt_dir.is_dir():
        return
    for child in sorted(ckpt_dir.iterdir()):
        if child.name.startswith(PRUNED_PREFIX) and child.is_dir():
            _delete(child)


def _delete(doomed: Path) -> None:
    # The trainer state goes first: a half-deleted directory, even when named directly, then reads as incomplete.
    (doomed / STATE_FILE).unlink(missing_ok=True)
    shutil.rmtree(doomed, ignore_errors=True)
