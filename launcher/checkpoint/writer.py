"""Writing checkpoints: atomic directories.

A checkpoint is built under a hidden temporary name (`.tmp-step_00000400`), synced to disk and renamed into place,
so a crash at any moment leaves either the whole directory or none of it. `trainer_state.json`, written last,
records every other file's size and checksum (`integrity.py`).
"""

from __future__ import annotations

import functools
import json
import os
import random
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from launcher.checkpoint import integrity
from launcher.checkpoint.formats import FORMATS, host_copy
from launcher.layout import (
    DATA_FILE,
    HF_DIR,
    RECIPE_FILE,
    RNG_FILE,
    SCALER_FILE,
    SCHEDULER_FILE,
    STATE_FILE,
    old_dir,
    tmp_dir,
)
from launcher.storage import Store, clear_uploaded, files_to_upload, shares


@dataclass(frozen=True)
class Save:
    """One save under way: where it goes, the trainer state and recipe it records, what runs once it is in place
    (retention), every rank's RNG state and, where the train set is a stream, every rank's place in it."""

    path: Path
    state: dict[str, Any]
    recipe_text: str
    after: Callable[[], None]
    rng_states: list[dict[str, Any]]
    files: dict[str, bytes]
    data_states: list[Any] | None = None

    def per_rank(self) -> dict[str, Any]:
        """The files of every rank's state, as the main process writes them."""
        data = {DATA_FILE: {"ranks": self.data_states}} if self.data_states is not None else {}
        return {RNG_FILE: {"ranks": self.rng_states}, **data}


class Writer:
    """Saves checkpoints of one model, optimizer and scheduler in format `fmt` (see `formats.py`). Every rank calls
    `save`; each hands its RNG state to the main process. With an unsharded format the main process alone writes
    (other ranks write nothing into the directory); with a sharded one every rank first writes its shard into the
    temporary directory, then the main process completes it.

    With `background`, the main process copies what it saves to host memory and writes it in a thread while
    training goes on: training stalls for the copy, not for the disk. One write is in flight at a time; `wait`
    blocks until it is on disk (and raises what it failed with).
    """

    def __init__(
        self,
        accelerator: Accelerator,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        fmt: str = "full",
        background: bool = False,
    ):
        self.accelerator = accelerator
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.format = FORMATS[fmt]
        self.background = background
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.files: dict[str, bytes] = {}  # written into every checkpoint's HF_DIR (a Hugging Face model's config)
        # This rank's place in a streamed train set (fresh tensors and plain values); None: no stream.
        self.data_state: Callable[[], Any] | None = None
        self.store: Store | None = None  # where checkpoints are uploaded once complete on disk (`store.py`)

    def save(
        self,
        path: Path,
        trainer_state: dict[str, Any],
        recipe_text: str,
        after: Callable[[], None] = lambda: None,
    ) -> None:
        """Write a checkpoint at `path` atomically, then run `after` (retention) on the main process."""
        state = {**trainer_state, "world_size": self.accelerator.num_processes, "format": self.format.name}
        data = None if self.data_state is None else _gather(self.accelerator, self.data_state())
        save = Save(path, state, recipe_text, after, _gather_rng(self.accelerator), self.files, data)
        if self.format.sharded:
            self._save_shards(save)
        else:
            self._save_main(save)

    def _save_main(self, save: Save) -> None:
        """The main process alone writes (the others wait for it unless it writes in the background)."""
        accelerator = self.accelerator
        if accelerator.is_main_process:
            self.wait()
            scaler = accelerator.scaler
            # A background write needs copies that later steps cannot change; a synchronous one writes the live
            # tensors (copied only off an accelerator), which spares a copy of the whole state.
            copy = self.background
            model_state = self.format.snapshot(accelerator, self.model, self.optimizer, copy)
            snapshot = {
                SCHEDULER_FILE: host_copy(self.scheduler.state_dict(), copy),
                **save.per_rank(),
                **({SCALER_FILE: host_copy(scaler.state_dict(), copy)} if scaler is not None else {}),
            }
            job = functools.partial(self._write_main, save, model_state, snapshot)
            if self.background:
                self.thread = threading.Thread(target=self._run, args=(job,), name="checkpoint-writer", daemon=True)
                self.thread.start()
            else:
                job()
        if not self.background:
            accelerator.wait_for_everyone()

    def _write_main(self, save: Save, model_state: Any, snapshot: dict[str, Any]) -> None:
        """The main process's checkpoint: model and optimizer state, then the rest (`_complete`), then (with a
        store) its upload, all of it by the main process, in the background thread where there is one."""
        self.format.write_snapshot(_fresh_tmp(save.path), model_state)
        _complete(save, snapshot)
        if self.store is not None:
            self.store.upload(save.path, list(files_to_upload(save.path)))
            self._publish(save.path)
        save.after()

    def _save_shards(self, save: Save) -> None:
        """Every rank writes its shard, then the main process completes the checkpoint."""
        accelerator = self.accelerator
        tmp = _fresh_tmp(save.path) if accelerator.is_main_process else tmp_dir(save.path)
        accelerator.wait_for_everyone()
        self.format.write_shards(tmp, self.model, self.optimizer)
        accelerator.wait_for_everyone()  # every shard is written
        if accelerator.is_main_process:
            self.format.tidy(tmp)
            snapshot = {SCHEDULER_FILE: host_copy(self.scheduler.state_dict()), **save.per_rank()}
            _complete(save, snapshot)
        accelerator.wait_for_everyone()
        if self.store is not None:  # every process uploads its share of the files, shards and all
            mine = shares(files_to_upload(save.path), accelerator.num_processes)[accelerator.process_index]
            self.store.upload(save.path, mine)
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                self._publish(save.path)
        if accelerator.is_main_process:
            save.after()
        accelerator.wait_for_everyone()

    def _publish(self, path: Path) -> None:
        """Every other file is in the store: its trainer state completes it there; the staging copy goes."""
        assert self.store is not None
        self.store.complete(path)
        clear_uploaded(path)

    def _run(self, job: Callable[[], None]) -> None:
        try:
            job()
        except BaseException as e:  # handed to the training thread by `wait`
            self.error = e

    def wait(self) -> None:
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.error is not None:
            error, self.error = self.error, None
            raise error


def _complete(save: Save, snapshot: dict[str, Any]) -> None:
    """Complete the checkpoint in its temporary directory (the weights or shards are there already), then rename
    it into place."""
    tmp = tmp_dir(save.path)
    for name, value in snapshot.items():
        torch.save(value, tmp / name)
    (tmp / RECIPE_FILE).write_text(save.recipe_text)
    if save.files:
        (tmp / HF_DIR).mkdir(exist_ok=True)
        for name, content in save.files.items():
            (tmp / HF_DIR / name).write_bytes(content)
    # Every file is in place (other ranks' shards too): their sizes and checksums go into the file that completes it.
    trainer_state = {**save.state, integrity.MANIFEST_KEY: integrity.manifest(tmp)}
    (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=2))
    _sync(tmp)  # on disk before the rename makes the directory count as complete
    replace_dir(tmp, save.path)


def _fresh_tmp(path: Path) -> Path:
    """`path`'s temporary directory, empty."""
    tmp = tmp_dir(path)
    if tmp.exists():
        shutil.rmtree(tmp)  # left by a crash during an earlier save of the same step
    tmp.mkdir(parents=True)
    return tmp


def _gather_rng(accelerator: Accelerator) -> list[dict[str, Any]]:
    rng: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return _gather(accelerator, rng)


def _gather(accelerator: Accelerator, value: Any) -> list[Any]:
    """Every rank's `value`, in rank order."""
    return list(gather_object([value])) if accelerator.num_processes > 1 else [value]


def _sync(directory: Path) -> None:
    """Every file (shards other ranks wrote included) and directory under `directory` on disk."""
    for item in [*sorted(directory.rglob("*"), reverse=True), directory]:
        if item.is_file():
            with item.open("rb") as f:
                os.fsync(f.fileno())
        else:
            fd = os.open(item, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def replace_dir(new: Path, path: Path) -> None:
    """Put `new` at `path`; an older directory there is moved aside first and removed only afterwards."""
    old = old_dir(path)
    if old.exists():
        shutil.rmtree(old)
    if path.exists():
        path.rename(old)
    new.rename(path)
    if old.exists():
        shutil.rmtree(old)
