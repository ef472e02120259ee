"""Checkpoints in object storage: `checkpoint.dir: s3://bucket/prefix` (or `gs://`, any fsspec URL).

Object stores have no rename, so a checkpoint cannot appear there atomically as a directory does on disk. It is
built as on disk, complete and checksummed, in the run dir's `checkpoints/` (the staging folder), then its files
are uploaded (each process its share, shards included) and `trainer_state.json` last, once every other file is
there: its presence is what makes a checkpoint complete in the store too, so a kill mid-upload leaves a prefix
without it, which every reader ignores and the next start deletes. Retention deletes the trainer state first.
The staging copy is removed once uploaded; a resume downloads the newest complete checkpoint that is intact.

Credentials come from where the storage's own tools look (AWS variables, profiles, instance roles; for GCS the
application default credentials), never from a recipe: a URL that holds any is refused.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from filelock import FileLock

from launcher.errors import RunFailed
from launcher.layout import (
    STATE_FILE,
    STEP_DIR,
    STEP_PREFIX,
    complete_steps,
    is_url,
    read_json,
    step_dir_name,
    tmp_dir,
)

# A store that does not answer fails the run's checks in seconds, not after botocore's minutes of retries.
S3_OPTIONS = {"config_kwargs": {"connect_timeout": 10, "read_timeout": 60, "retries": {"max_attempts": 3}}}


def url_problem(key: str, url: str) -> str | None:
    """`key: ...` for a storage URL that cannot be used as written (credentials in it, no bucket, an unknown
    protocol or one whose package is missing); None for a usable one."""
    parts = urlsplit(url)
    if parts.username or parts.password:
        return (
            f"{key}: {parts.scheme}://...: the URL holds credentials; give them as the storage's tools expect "
            "(AWS_ACCESS_KEY_ID / AWS_PROFILE, gcloud's application default credentials), never in a recipe"
        )
    if not parts.netloc:
        return f"{key}: expected {parts.scheme}://BUCKET/PREFIX, got {url!r}"
    import fsspec

    try:
        fsspec.get_filesystem_class(parts.scheme)
    except ImportError as e:  # fsspec names the package: s3fs, gcsfs, adlfs...
        return f"{key}: {url}: {_first_line(e)} (s3fs and gcsfs come with pip install 'launcher[storage]')"
    except ValueError as e:
        return f"{key}: {url}: {_first_line(e)}"
    return None


class Store:
    """The checkpoints under one storage URL."""

    def __init__(self, url: str):
        import fsspec

        self.url = url.rstrip("/")
        s3 = urlsplit(self.url).scheme in ("s3", "s3a")
        self.fs, self.root = fsspec.core.url_to_fs(self.url, **(S3_OPTIONS if s3 else {}))

    def where(self, step: int) -> str:
        """A checkpoint's URL, as the user would write it."""
        return f"{self.url}/{step_dir_name(step)}"

    def key(self, step: int, name: str = "") -> str:
        return f"{self.root}/{step_dir_name(step)}" + (f"/{name}" if name else "")

    def steps(self) -> dict[int, bool]:
        """Every step prefix in the store, and whether its trainer state is there (complete)."""
        self.fs.invalidate_cache()  # listings are cached; another process may have uploaded since
        try:
            names = self.fs.ls(self.root, detail=False)
        except FileNotFoundError:
            return {}
        steps = {}
        for name in names:
            match = STEP_DIR.match(name.rstrip("/").rsplit("/", 1)[-1])
            if match:
                steps[int(match.group(1))] = False
        for found in self.fs.glob(f"{self.root}/{STEP_PREFIX}*/{STATE_FILE}"):
            match = STEP_DIR.match(found.rsplit("/", 2)[-2])
            if match:
                steps[int(match.group(1))] = True
        return steps

    def complete_steps(self) -> list[int]:
        return sorted(step for step, complete in self.steps().items() if complete)

    def incomplete_steps(self) -> list[int]:
        return sorted(step for step, complete in self.steps().items() if not complete)

    def read_state(self, step: int) -> dict[str, Any]:
        try:
            value = json.loads(self.fs.cat_file(self.key(step, STATE_FILE)))
        except (OSError, ValueError):
            return {}
        return value if isinstance(value, dict) else {}

    def upload(self, local: Path, names: Sequence[str]) -> None:
        """Files of the checkpoint at `local` (paths relative to it), to the prefix of the same step."""
        step = _step_of(local)
        for name in names:
            self._put(local / name, step, name)

    def complete(self, local: Path) -> None:
        """Upload the trainer state, last: from now on the checkpoint counts as complete in the store."""
        self._put(local / STATE_FILE, _step_of(local), STATE_FILE)

    def _put(self, file: Path, step: int, name: str) -> None:
        """One file up; a failure (after the client's own retries) ends the run in one line."""
        try:
            self.fs.put_file(str(file), self.key(step, name))
        except Exception as e:  # every client library raises its own kinds
            try:
                complete = self.complete_steps()
                newest = f"step {complete[-1]}" if complete else "none"
            except Exception:  # the store does not answer at all
                newest = "unknown (the store does not answer)"
            raise RunFailed(
                f"error: uploading {self.where(step)}/{name} failed: {_first_line(e)}; "
                f"the newest complete checkpoint there: {newest}"
            ) from None

    def delete(self, step: int) -> None:
        """The trainer state goes first: a kill during the deletion leaves an incomplete prefix, ignored."""
        self.fs.rm(self.key(step, STATE_FILE))
        self.delete_incomplete(step)

    def delete_incomplete(self, step: int) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(self.key(step), recursive=True)

    def download(self, step: int, dest: Path) -> None:
        """The checkpoint of `step` into `dest` (a step dir), built under its temporary name and renamed."""
        tmp = tmp_dir(dest)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        prefix = self.key(step)
        for key in self.fs.find(prefix):
            target = tmp / key[len(prefix) + 1 :]
            target.parent.mkdir(parents=True, exist_ok=True)
            self.fs.get_file(key, str(target))
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)

    def prune(self, steps: Sequence[int]) -> None:
        """Delete these checkpoints (the ones retention removes)."""
        for step in steps:
            self.delete(step)


def shares(sizes: dict[str, int], world: int) -> list[list[str]]:
    """The files each of `world` processes uploads, balanced by size (largest first, each to the least loaded);
    every process computes the same split from the same listing."""
    loads = [0] * world
    out: list[list[str]] = [[] for _ in range(world)]
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        rank = loads.index(min(loads))
        out[rank].append(name)
        loads[rank] += sizes[name]
    return out


def files_to_upload(local: Path) -> dict[str, int]:
    """Every file of the checkpoint at `local` but its trainer state, with its size."""
    return {
        p.relative_to(local).as_posix(): p.stat().st_size
        for p in sorted(local.rglob("*"))
        if p.is_file() and p.name != STATE_FILE
    }


def fetch_newest(store: Store, staging: Path, problems: Callable[[Path], str | None]) -> tuple[Path | None, list[str]]:
    """Download the newest complete checkpoint in the store that is intact (by `problems`) into `staging`, and a
    line for each newer one passed over. Every process of a launch calls this: the first to take the lock
    downloads, the others find its copy (same trainer state) in place."""
    staging.mkdir(parents=True, exist_ok=True)
    passed_over = []
    with FileLock(str(staging / ".download.lock")):
        for step in reversed(store.complete_steps()):
            local = staging / step_dir_name(step)
            remote_state = store.fs.cat_file(store.key(step, STATE_FILE))
            held = local / STATE_FILE
            if not (held.is_file() and held.read_bytes() == remote_state):
                store.download(step, local)
            problem = problems(local)
            if problem is None:
                _clear_staging(staging, keep=local)
                return local, passed_over
            passed_over.append(f"{store.where(step)}: damaged: {problem}")
        _clear_staging(staging, keep=None)
    return None, passed_over


def clear_uploaded(local: Path) -> None:
    """Once the checkpoint at `local` is complete in the store: its staging copy goes, and with it the older ones
    there (the download a resume started from)."""
    step = _step_of(local)
    for child in local.parent.iterdir():
        match = STEP_DIR.match(child.name)
        if match and int(match.group(1)) <= step:
            shutil.rmtree(child, ignore_errors=True)


def _clear_staging(staging: Path, keep: Path | None) -> None:
    """What earlier attempts left in the staging folder (checkpoints written but not uploaded, downloads)."""
    for child in staging.iterdir():
        if child.is_dir() and child != keep:
            shutil.rmtree(child, ignore_errors=True)


def checkpoints_at(where: str | Path) -> tuple[list[int], dict[str, Any]]:
    """The complete checkpoints' steps in a folder or under a storage URL, and the newest one's trainer state;
    nothing where the store cannot be read (what reports it is a report, not a run)."""
    if isinstance(where, Path) or not is_url(where):
        steps = complete_steps(Path(where))
        return steps, read_json(Path(where) / step_dir_name(steps[-1]) / STATE_FILE) if steps else {}
    try:
        store = Store(where)
        steps = store.complete_steps()
        return steps, store.read_state(steps[-1]) if steps else {}
    except Exception:  # no credentials here, no network, the client library missing
        return [], {}


def probe(url: str) -> str | None:
    """Why a run could not write checkpoints at `url` (one line, no credentials), or None: an object is written
    under the prefix and deleted at once, the only sure test."""
    try:
        store = Store(url)
        key = f"{store.root}/.launcher-probe"
        store.fs.pipe_file(key, b"")
        store.fs.rm(key)
    except Exception as e:  # every client library raises its own kinds; the user needs the reason, in a line
        return f"cannot write to {url}: {_first_line(e)}"
    return None


def _step_of(local: Path) -> int:
    match = STEP_DIR.match(local.name)
    if match is None:
        raise ValueError(f"{local}: not a step dir")
    return int(match.group(1))


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


__all__ = ["Store", "clear_uploaded", "fetch_newest", "files_to_upload", "is_url", "probe", "shares", "url_problem"]
