"""The run's progress on the main process: tqdm's bar on a terminal; elsewhere (a SLURM job's log, a pipe) a plain
line at most every 30 s, since tqdm redraws its bar with carriage returns that fill a log file with one long line."""

from __future__ import annotations

import sys
import time
from datetime import timedelta
from typing import Any, TextIO

from tqdm.auto import tqdm

EVERY_S = 30.0


class PlainProgress:
    """tqdm's calls the loop makes (update, set_postfix, write, close), written as plain lines:
    `quickstart: step 120/768 (15.6%), 12.3 it/s, eta 0:00:52, loss=2.1034, lr=3.00e-04`."""

    def __init__(self, total: int, initial: int, desc: str, every_s: float = EVERY_S):
        self.total, self.step, self.desc, self.every_s = total, initial, desc, every_s
        self.postfix: dict[str, Any] = {}
        self.last_time, self.last_step = time.monotonic(), initial
        self.closed = False

    def update(self, n: int = 1) -> None:
        self.step += n
        if time.monotonic() - self.last_time >= self.every_s:
            self._line()

    def set_postfix(self, refresh: bool = False, **values: Any) -> None:
        self.postfix = values  # shown with the next line, as tqdm shows it at its next redraw

    @staticmethod
    def write(line: str, file: TextIO | None = None) -> None:
        tqdm.write(line, file=file)

    def close(self) -> None:
        """The last line, where steps were made since the one before (the loop closes it twice on some paths)."""
        if not self.closed and self.step > self.last_step:
            self._line()
        self.closed = True

    def _line(self) -> None:
        now = time.monotonic()
        rate = (self.step - self.last_step) / max(now - self.last_time, 1e-9)
        done = 100.0 * self.step / max(self.total, 1)
        eta = timedelta(seconds=round((self.total - self.step) / rate)) if rate > 0 else "?"
        extra = "".join(f", {k}={v}" for k, v in self.postfix.items())
        line = f"{self.desc}: step {self.step}/{self.total} ({done:.1f}%), {rate:.1f} it/s, eta {eta}{extra}"
        print(line, file=sys.stderr, flush=True)
        self.last_time, self.last_step = now, self.step


Progress = tqdm | PlainProgress


def make(total: int, initial: int, desc: str, shown: bool) -> Progress:
    """tqdm's bar on a terminal; plain lines elsewhere; a disabled tqdm (whose `write` still prints) when not shown."""
    if shown and not sys.stderr.isatty():
        return PlainProgress(total, initial, desc)
    return tqdm(total=total, initial=initial, desc=desc, disable=not shown, dynamic_ncols=True, mininterval=0.1)
