"""A checkpoint named by its path (`resume=PATH`, `<checkpoints>/latest`): whether a run can resume from it.

`launcher validate` and the run's start ask the same question, so they refuse the same checkpoints alike.
"""

from __future__ import annotations

from pathlib import Path

from launcher.checkpoint import integrity
from launcher.checkpoint.retention import interrupted, resolve
from launcher.layout import STATE_FILE, is_complete


def resume_problem(path: Path) -> str | None:
    """`<path> ...` when the checkpoint at `path` (or the one `latest`/`best` there names) is not complete and
    intact, as one line; None when a run can resume from it. Reads every file's checksum where it has them."""
    path = resolve(path)
    if not is_complete(path):
        return f"{path} is not a complete checkpoint (no {STATE_FILE})"
    if interrupted(path):
        return f"{path} is not a complete checkpoint (a save interrupted before its rename)"
    problem = integrity.problems(path)
    return f"{path}: damaged: {problem}" if problem else None
