"""The trackers a run logs to, as Accelerate takes them (`Accelerator(log_with=...)`).

TensorBoard is Accelerate's own tracker with a cheaper `log`. Accelerate's writes one event per value and flushes
at every call, which hands the events to TensorBoard's writer thread and waits for it: with its pure-Python
checksums that thread then competes with training for the interpreter, and logging every 10 steps cost a fast
loop several percent of its speed. Here each call keeps its scalars as one event in memory, and the events go to
the writer together every `FLUSH_SECS` and when the run ends (so a killed run's TensorBoard view may lack its last
seconds; `metrics.jsonl` is flushed per line). Every other tracker is Accelerate's, by name.
"""

from __future__ import annotations

import numbers
import time
from typing import Any

from accelerate.tracking import GeneralTracker, TensorBoardTracker, on_main_process

FLUSH_SECS = 10.0


class TensorBoard(TensorBoardTracker):
    def __init__(self, logging_dir: str):
        super().__init__("tensorboard", logging_dir, max_queue=1000, flush_secs=3600)
        self.pending: list[tuple[Any, int | None, float]] = []  # (summary, step, wall time)
        self.last_write = time.monotonic()

    @on_main_process
    def log(self, values: dict[str, Any], step: int | None = None, **kwargs: Any) -> None:
        from tensorboard.compat.proto.summary_pb2 import Summary

        scalars = [Summary.Value(tag=k, simple_value=float(v)) for k, v in values.items() if _scalar(v)]
        if scalars:
            self.pending.append((Summary(value=scalars), step, time.time()))
        rest = {k: v for k, v in values.items() if not _scalar(v)}
        if rest:  # text and the like, rare: Accelerate's way, after what came before
            self.write_pending()
            super().log(rest, step, **kwargs)
        elif time.monotonic() - self.last_write >= FLUSH_SECS:
            self.write_pending()

    def write_pending(self) -> None:
        file_writer = self.writer._get_file_writer()  # torch's SummaryWriter (tensorboard is a dependency)
        for summary, step, wall_time in self.pending:
            file_writer.add_summary(summary, step, wall_time)
        self.pending.clear()
        self.writer.flush()
        self.last_write = time.monotonic()

    @on_main_process
    def finish(self) -> None:
        self.write_pending()
        super().finish()


def _scalar(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def trackers(names: tuple[str, ...], logging_dir: str) -> list[str | GeneralTracker] | None:
    """What `Accelerator(log_with=...)` gets for the recipe's `logging.trackers` (`jsonl` is the loop's own)."""
    out: list[str | GeneralTracker] = [TensorBoard(logging_dir) if name == "tensorboard" else name for name in names]
    return [t for t in out if t != "jsonl"] or None
