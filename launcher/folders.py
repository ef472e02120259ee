"""Whether a run can write where its recipe says (the run dir, the checkpoints' folder), asked before it starts.

A path that is a file, lies under a file, or sits in a folder nothing may be created in (a read-only mount,
`/proc`, another user's folder) would otherwise fail at the run's start, or at its first checkpoint after hours
of training. The only sure test is to try: a folder is made and removed at once in the nearest folder that
exists, so nothing is left behind.

No torch here: `launcher validate` asks this.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def problem(key: str, path: Path) -> str | None:
    """`key: ...` when a run cannot make `path` a folder and write into it; None when it can."""
    existing = next((p for p in (path, *path.parents) if p.exists() or p.is_symlink()), None)
    if existing is None:
        return None  # nothing of the path exists, not even its root: nothing to ask
    if not existing.is_dir():
        where = "is" if existing == path else f"lies under {existing}, which is"
        return f"{key}: {path} {where} a file, not a folder"
    try:
        probe = tempfile.mkdtemp(prefix=".launcher-probe-", dir=existing)
    except OSError as e:
        what = f"write into {path}" if existing == path else f"make {path}: nothing can be created in {existing}"
        return f"{key}: cannot {what} ({e.strerror or e})"
    with contextlib.suppress(OSError):
        os.rmdir(probe)
    return None
