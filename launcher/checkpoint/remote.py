"""`launcher ckpt info` and `ckpt export` on checkpoints in object storage (`store.py`).

`ckpt info URL` lists what the store holds without downloading it: each checkpoint's trainer state, and its
files' sizes against the manifest (checksums are verified where a checkpoint is downloaded: to resume or export).
`ckpt export URL` downloads the checkpoint next to `--out` and exports it as one on disk.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from launcher.checkpoint import integrity
from launcher.checkpoint.info import recipe_names
from launcher.checkpoint.retention import best_step
from launcher.layout import BEST, LATEST, RECIPE_FILE, STATE_FILE, STEP_DIR, step_dir_name
from launcher.storage import Store


class NotFound(Exception):
    """The URL names no checkpoint (the message says so in one line)."""


def locate(url: str) -> tuple[Store, list[int], bool]:
    """The store a URL lies in, the steps it names (one for a checkpoint, `latest` or `best`; every step prefix
    for a folder of them) and whether it names one checkpoint."""
    head, _, name = url.rstrip("/").rpartition("/")
    match = STEP_DIR.match(name)
    if match or name in (LATEST, BEST):
        store = Store(head)
        complete = store.complete_steps()
        if match:
            return store, [int(match.group(1))], True
        if not complete:
            raise NotFound(f"{url}: {head} holds no complete checkpoint")
        return store, [complete[-1] if name == LATEST else _best(store, complete)], True
    store = Store(url)
    return store, sorted(store.steps()), False  # one listing: complete and incomplete


def _best(store: Store, steps: list[int]) -> int:
    step = best_step({step: store.read_state(step) for step in steps})
    if step is None:
        raise NotFound(f"{store.url}: no checkpoint records a metric to be best by")
    return step


def summary(store: Store, step: int) -> dict[str, Any]:
    """`info.summary`'s fields for a checkpoint in the store, its files' sizes checked against its manifest."""
    prefix = store.key(step)
    sizes = {key[len(prefix) + 1 :]: int(entry["size"]) for key, entry in store.fs.find(prefix, detail=True).items()}
    info: dict[str, Any] = {
        "checkpoint": store.where(step),
        "complete": STATE_FILE in sizes,
        "size_bytes": sum(sizes.values()),
        "files": len(sizes),
        "problem": None,
    }
    if not info["complete"]:
        return info
    state = store.read_state(step)
    manifest = state.get(integrity.MANIFEST_KEY)
    if not isinstance(manifest, dict):
        info["problem"] = f"{STATE_FILE}: no manifest of its files"
        return info
    for name, entry in sorted(manifest.items()):
        if sizes.get(name) != (entry or {}).get("size"):
            found = "missing" if name not in sizes else f"{sizes[name]} bytes, expected {entry.get('size')}"
            info["problem"] = f"{name}: {found}"
            return info
    info.update({k: state.get(k) for k in ("step", "epoch", "samples_in_epoch", "world_size", "monitor")})
    info.update(_recipe_names(store, step))
    return info


def _recipe_names(store: Store, step: int) -> dict[str, Any]:
    try:
        return recipe_names(store.fs.cat_file(store.key(step, RECIPE_FILE)))
    except OSError:
        return {}


def download(url: str, into: Path) -> Path:
    """The complete checkpoint a URL names, downloaded into the folder `into`; its local step dir."""
    store, steps, one = locate(url)
    if not one:
        raise NotFound(f"{url}: a folder of checkpoints; name one: {url.rstrip('/')}/{LATEST}, /{BEST} or /step_...")
    step = steps[0]
    if step not in store.complete_steps():
        raise NotFound(f"{url}: not a complete checkpoint (no {STATE_FILE}: an interrupted upload)")
    local = into / step_dir_name(step)
    store.download(step, local)
    return local
