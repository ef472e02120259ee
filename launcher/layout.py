"""Where a run keeps its files: the run dir's file names and the checkpoints' step dirs.

No torch here: `launcher report` reads a run dir without loading it (or the seconds it takes to import).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

RECIPE_FILE = "recipe.yaml"  # the resolved recipe (also in every checkpoint)
ENV_FILE = "env.json"
LAST_RUN_FILE = "last_run.json"
METRICS_FILE = "metrics.jsonl"
ROLLED_BACK_FILE = "metrics.rolled_back.jsonl"  # rows a failed attempt logged after its last checkpoint
HISTORY_FILE = "history.jsonl"  # one line per attempt's start and end: what `launcher report` counts resumes by
SLURM_ATTEMPTS_FILE = "attempts.jsonl"  # in <run_dir>/slurm/: one line per start of the job, and per requeue
LOCK_FILE = ".lock"  # held by a live run's main process: one run per run dir (see runlock.py)
LOCK_HOLDER_FILE = ".lock_holder.json"  # who holds it: host, pid, SLURM job
STATE_FILE = "trainer_state.json"  # in a checkpoint, written last: its presence makes the checkpoint complete
STEP_DIR = re.compile(r"^step_(\d+)$")


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def is_complete(path: Path) -> bool:
    return (path / STATE_FILE).is_file()


def complete_steps(ckpt_dir: Path) -> list[int]:
    """Steps of the complete checkpoints under `ckpt_dir`, oldest first; partial or foreign dirs are ignored."""
    if not ckpt_dir.is_dir():
        return []
    steps = []
    for child in ckpt_dir.iterdir():
        match = STEP_DIR.match(child.name)
        if match and is_complete(child):
            steps.append(int(match.group(1)))
    return sorted(steps)


def read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The lines of a JSON-lines file that parse (a line cut short by a crash is skipped)."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows
