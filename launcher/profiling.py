"""torch.profiler traces of a few updates (the recipe's `profile` section): one Chrome-trace file per traced rank
in `<run_dir>/profile/`, and on CUDA with `memory` a memory snapshot beside it.

Off by default, and then free: the loop holds no profiler (`make` gives None) and checks one `None` per update.
On, the torch profiler is made only just before the window's first update, numbered as the run's updates
(`ProfilerStep#N` is update N, as logged), and stopped at the window's end or on the way out.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.profiler import ProfilerAction, ProfilerActivity

from launcher.layout import MEMORY_SNAPSHOT_SUFFIX, PROFILE_DIR, TRACE_SUFFIX, profile_name, tmp_dir
from launcher.recipe import ProfileConfig

if TYPE_CHECKING:
    from accelerate import Accelerator

Say = Callable[[str], None]
MEMORY_HISTORY_ENTRIES = 100_000  # allocations and frees a CUDA memory snapshot keeps, the newest (torchtitan's)


@dataclass(frozen=True)
class Window:
    """The updates the profiler runs for, numbered as logged (the first update is 1): from `begin` it warms up
    (runs without recording), from `start` to `last` it records."""

    begin: int
    start: int
    last: int

    def action(self, update: int) -> ProfilerAction:
        """The profiler's schedule: what it does during `update`."""
        if not self.begin <= update <= self.last:
            return ProfilerAction.NONE
        if update < self.start:
            return ProfilerAction.WARMUP
        return ProfilerAction.RECORD_AND_SAVE if update == self.last else ProfilerAction.RECORD


def window(config: ProfileConfig, done: int, total: int) -> Window | str:
    """The window of an attempt that starts after `done` of the run's `total` updates, or why there is none."""
    start, first = config.start_step, done + 1
    if start > total:
        return f"the run ends at update {total}, before profile.start_step ({start}): nothing is profiled"
    if first > start:
        return f"this attempt starts at update {first}, past profile.start_step ({start}): nothing is profiled"
    return Window(max(start - config.warmup, first), start, min(start + config.steps - 1, total))


def traced(config: ProfileConfig, rank: int) -> bool:
    return config.ranks == "all" or rank in config.ranks


def make(
    config: ProfileConfig | None, accelerator: Accelerator, run_dir: str, done: int, total: int, say: Say
) -> Profiler | None:
    """This rank's profiler, or None: no `profile` section, a rank not traced, or no window in this attempt (the
    main process says why)."""
    if config is None:
        return None
    found = window(config, done, total)
    if isinstance(found, str):
        if accelerator.is_main_process:
            say(f"note: profile: {found}")
        return None
    rank = accelerator.process_index
    if not traced(config, rank):
        return None
    cuda = accelerator.device.type == "cuda"
    return Profiler(config, found, rank, cuda, Path(run_dir) / PROFILE_DIR, done, say)


class Profiler:
    """One rank's profiler: told the updates done before the first and after each (`step`); started just before
    the window's first update, writes its files at the window's end, or when `close`d before (an error, a run
    that stopped early) what it recorded."""

    def __init__(
        self,
        config: ProfileConfig,
        window: Window,
        rank: int,
        cuda: bool,
        folder: Path,
        done: int,
        say: Say,
    ):
        self.config, self.window, self.rank, self.cuda, self.folder, self.say = config, window, rank, cuda, folder, say
        self.done = done
        self.prof: torch.profiler.profile | None = None
        self.memory_history = False  # CUDA allocations being recorded for the snapshot
        self.step(done)  # the window may begin with the attempt's first update

    def step(self, done: int) -> None:
        """`done` updates are done; the next one is `done + 1`."""
        self.done = done
        if self.prof is None:
            if done + 1 != self.window.begin:
                return
            self.prof = self.start(done + 1)
        else:
            self.prof.step()
        if done + 1 == self.window.start and self.cuda and self.config.memory:
            torch.cuda.memory._record_memory_history(max_entries=MEMORY_HISTORY_ENTRIES)
            self.memory_history = True
        if done >= self.window.last:
            self.close()

    def start(self, update: int) -> torch.profiler.profile:
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        c = self.config
        prof = torch.profiler.profile(
            activities=activities,
            schedule=self.window.action,
            on_trace_ready=self.write,
            profile_memory=c.memory,
            record_shapes=c.memory,
            with_stack=c.with_stack,
        )
        # The profiler counts its steps from 0; set to the run's count, it asks the schedule about update N and
        # names the step's span ProfilerStep#N. Started at the update before (nothing to do there), then stepped.
        prof.step_num = update - 1
        prof.start()
        prof.step()
        return prof

    def write(self, prof: torch.profiler.profile) -> None:
        """The recording's files (the profiler's `on_trace_ready`), each complete or not there."""
        first, last = self.window.start, max(self.window.start, min(self.done, self.window.last))
        self.save(self.folder / profile_name(self.rank, first, last, TRACE_SUFFIX), prof.export_chrome_trace)
        if self.memory_history:
            snapshot = self.folder / profile_name(self.rank, first, last, MEMORY_SNAPSHOT_SUFFIX)
            self.save(snapshot, torch.cuda.memory._dump_snapshot)
            self.stop_memory_history()

    def save(self, path: Path, export: Callable[[str], Any]) -> None:
        """Written beside its place and renamed into it; a failure is said, and training goes on."""
        tmp = tmp_dir(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            export(str(tmp))
            os.replace(tmp, path)
        except Exception as e:  # a trace that cannot be written must not end the run
            tmp.unlink(missing_ok=True)
            self.say(f"warning: profile: could not write {path}: {type(e).__name__}: {e}")

    def stop_memory_history(self) -> None:
        if self.memory_history:
            self.memory_history = False
            torch.cuda.memory._record_memory_history(enabled=None)

    def close(self) -> None:
        """Stop profiling (again: nothing); a recording cut short is written as far as it went."""
        prof, self.prof = self.prof, None
        if prof is None:
            return
        try:
            prof.stop()
        except Exception as e:  # on the way out with an error, that error is the one to see
            self.say(f"warning: profile: stopping the profiler failed: {type(e).__name__}: {e}")
        finally:
            self.stop_memory_history()
