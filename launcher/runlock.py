"""One run per run dir: the main process holds an OS-level lock on the run dir for as long as the run lives.

Two launches on one run dir (a resubmitted job, a double click) would otherwise both pass the "already holds a
run" check, append to one `metrics.jsonl` and delete each other's checkpoint files mid-save. The lock is a `flock`
(through `filelock`), which the kernel releases when its holder exits, however it exits (SIGKILL included), so a
crashed run never blocks the next. Who holds it (host, pid, SLURM job) is written beside it for the refusal line:
`filelock` truncates the lock file itself on every attempt, so it cannot carry that.

No torch here: the lock is taken before any process group starts.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from launcher.errors import RecipeError
from launcher.layout import LOCK_FILE, LOCK_HOLDER_FILE, read_json


def acquire(run_dir: Path) -> FileLock | None:
    """The run dir's lock, held by this process from now on; None when another process holds it.

    Creates `run_dir` if it does not exist (the lock must live in it to guard it)."""
    missing = [d for d in (run_dir, *run_dir.parents) if not d.exists()]  # the folders mkdir makes, deepest first
    made = [run_dir / LOCK_FILE, *missing] if not (run_dir / LOCK_FILE).exists() else []
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = FileLock(run_dir / LOCK_FILE, timeout=0, thread_local=False)
        lock.acquire()
    except Timeout:
        return None
    except OSError as e:  # checked by validate too; here for what changed since, or a launch without it
        _remove(made)
        raise RecipeError(f"run_dir: cannot make {run_dir} a run dir: {e.strerror or e}") from None
    lock.made = made  # what taking the lock made, undone where the run is refused (see `release`)
    _write_holder(run_dir)
    return lock


def release(lock: FileLock | None, undo: bool = False) -> None:
    """Let go of the run dir; `undo`: the run was refused before it wrote anything, so what taking the lock made
    goes too (the lock file where it was new, the run dir where it was made for the lock alone and still holds
    nothing else): a refused run leaves the run dir as it found it."""
    if lock is None:
        return
    run_dir = Path(lock.lock_file).parent
    (run_dir / LOCK_HOLDER_FILE).unlink(missing_ok=True)
    lock.release(force=True)
    if undo:
        _remove(getattr(lock, "made", []))


def _remove(made: list[Path]) -> None:
    """The lock file and folders the lock made, deepest first; a folder something else was put in stays."""
    for path in made:
        with contextlib.suppress(OSError):
            if path.is_dir():
                path.rmdir()
            else:
                path.unlink()


def holder(run_dir: Path) -> str:
    """Who holds the lock, as words for the refusal line. The holder writes this just after it takes the lock, so
    a refusal in that instant waits a moment for it."""
    info: dict[str, Any] = {}
    for _ in range(20):
        info = read_json(run_dir / LOCK_HOLDER_FILE)
        if info:
            break
        time.sleep(0.05)
    if not info:
        return "another run"
    parts = [f"host {info.get('host', '?')}", f"pid {info.get('pid', '?')}"]
    if info.get("slurm_job"):
        parts.append(f"SLURM job {info['slurm_job']}")
    if info.get("since"):
        parts.append(f"since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(info['since']))}")
    return f"a run on {', '.join(parts)}"


def in_use_message(run_dir: Path) -> str:
    return (
        f"run_dir: {run_dir} is in use by {holder(run_dir)}; wait for it to end, or give this run another "
        "run_dir=<folder>"
    )


def _write_holder(run_dir: Path) -> None:
    info = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "slurm_job": os.environ.get("SLURM_JOB_ID"),
        "since": round(time.time(), 3),
    }
    tmp = run_dir / f"{LOCK_HOLDER_FILE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(info) + "\n")
    tmp.replace(run_dir / LOCK_HOLDER_FILE)
