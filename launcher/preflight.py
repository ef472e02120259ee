"""What is refused before any process group starts or any file is written: bad launches, and a run dir that is
in use or holds another run; the checkpoint to resume from."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock

from launcher import checkpoint, consensus, guards, processes, runlock, strategies
from launcher.checkpoint import integrity
from launcher.errors import RecipeError, say
from launcher.layout import METRICS_FILE
from launcher.recipe import Recipe
from launcher.storage import Store, fetch_newest


@dataclass
class Start:
    """What `preflight` found: the checkpoint to resume from, the run dir's lock (held by the main process), and
    what this process refuses the run for where the others must hear of it first (see `run`)."""

    resume_from: Path | None = None
    saved: dict[str, Any] | None = None  # its trainer state, read once for everything the run sets up from it
    lock: FileLock | None = None
    refusal: list[str] = field(default_factory=list)
    restart: int = 0  # how often the elastic agent restarted the processes (a restarted run continues by itself)


def preflight(recipe: Recipe, env: Mapping[str, str]) -> Start:
    """Refuse, before any process group starts or file is written, what would fail or destroy work later; take
    the run dir's lock (main process), so that nothing below races another run on the same run dir.

    What follows from the recipe and the launch alone is the same on every process: refused at once. What depends
    on the run dir (another run holding it, its checkpoints) can change between two processes' looks while another
    run writes there: with several processes it is agreed on first, so that all of them refuse together instead of
    some waiting for the others in the process group until the timeout."""
    t = recipe.train
    problems = guards.launch_problems(env, t.mixed_precision, recipe.strategy.name, t.gradient_accumulation_steps)
    problems += strategies.choose(recipe, guards.launched_world(env)).world_problems()
    if t.mixed_precision == "fp16" and not torch.cuda.is_available():
        problems.append("train.mixed_precision: fp16 needs a CUDA GPU; use bf16 or no on CPU")
    if problems:
        raise RecipeError(problems)
    run_dir = Path(recipe.run_dir)
    alone = guards.launched_world(env) == 1
    lock = None
    if env.get("RANK", "0") == "0":
        lock = runlock.acquire(run_dir)
        if lock is None:
            return _refused([runlock.in_use_message(run_dir)], alone)
    try:
        if lock is not None:
            # A stop file asked the last attempt to stop; this one starts anew (before any process looks for it).
            (run_dir / consensus.STOP_FILE).unlink(missing_ok=True)
            # A kill during the last attempt's retention left a checkpoint half deleted, hidden: finish it.
            checkpoint.finish_pruning(recipe.checkpoint_dir)
        restart = processes.restart_count(env)
        resume_from = _resume_point(recipe, env, restarted=restart > 0)
        return Start(resume_from=resume_from, saved=_saved_state(resume_from), lock=lock, restart=restart)
    except RecipeError as e:
        runlock.release(lock, undo=True)
        return _refused(e.problems, alone)
    except BaseException:
        runlock.release(lock, undo=True)
        raise


def _saved_state(path: Path | None) -> dict[str, Any] | None:
    """The trainer state of the checkpoint to resume from (checked intact just before)."""
    if path is None:
        return None
    try:
        return integrity.read_state(path)
    except integrity.Damaged as e:  # changed since its check: another run writing there
        raise RecipeError(f"resume: {path}: damaged: {e}") from None


def _refused(problems: list[str], alone: bool) -> Start:
    if alone:
        raise RecipeError(problems)
    return Start(refusal=problems)


def _resume_point(recipe: Recipe, env: Mapping[str, str], restarted: bool) -> Path | None:
    """The checkpoint to resume from, if any; refuses to start a new run over an old one. Processes the elastic
    agent restarted after a failure continue from the newest complete checkpoint (from the start where none was
    written yet), whatever `resume` says: it told the first attempt where to begin."""
    run_dir = Path(recipe.run_dir)
    store = Store(recipe.checkpoint_store) if recipe.checkpoint_store else None
    where = recipe.checkpoint_store or recipe.checkpoint_dir
    complete = store.complete_steps() if store else checkpoint.complete_steps(recipe.checkpoint_dir)
    if recipe.resume == "auto" or (restarted and complete):
        main = env.get("RANK", "0") == "0"
        found, passed_over = _newest_intact(recipe, store, main)
        if main:
            for line in passed_over:
                say(f"warning: passing over {line}")
        if found is None and passed_over:  # starting anew would train over the run's checkpoints
            raise RecipeError(f"resume: every checkpoint in {where} is damaged, the newest: {passed_over[0]}")
        return found
    if recipe.resume != "none":
        path = checkpoint.resolve(Path(recipe.resume))
        problem = checkpoint.resume_problem(path)
        if problem:
            raise RecipeError(f"resume: {problem}")
        return path
    if not restarted and ((run_dir / METRICS_FILE).exists() or complete):
        held = f"run_dir: {run_dir}" if (run_dir / METRICS_FILE).exists() or not store else f"checkpoint.dir: {where}"
        raise RecipeError(
            f"{held} already holds a run; continue it with resume=auto, "
            f"or start a new one with run_dir=<another folder>"
            + (" and checkpoint.dir=<another prefix>" if store else "")
        )
    return None


def _newest_intact(recipe: Recipe, store: Store | None, main: bool) -> tuple[Path | None, list[str]]:
    """The newest complete, intact checkpoint (downloaded into the staging folder from a store), and a line for
    each newer one passed over. Every rank checks the same files, so all pick the same checkpoint without a word
    between them."""
    if store is None:
        if main:
            for path in checkpoint.incomplete(recipe.checkpoint_dir):
                say(f"warning: ignoring {path}: an interrupted save left it incomplete")
        return checkpoint.latest_intact(recipe.checkpoint_dir)
    if main:  # under the run dir's lock: no other run writes there
        for step in store.incomplete_steps():
            say(f"warning: deleting {store.where(step)}: an interrupted upload or deletion left it incomplete")
            store.delete_incomplete(step)
    return fetch_newest(store, recipe.checkpoint_dir, integrity.problems)
