"""The trackers a run logs to, as Accelerate takes them (`Accelerator(log_with=...)`).

TensorBoard is Accelerate's own tracker with a cheaper `log`. Accelerate's writes one event per value and flushes
at every call, which hands the events to TensorBoard's writer thread and waits for it: with its pure-Python
checksums that thread then competes with training for the interpreter, and logging every 10 steps cost a fast
loop several percent of its speed. Here each call keeps its scalars as one event in memory, and the events go to
the writer together every `FLUSH_SECS`, at every checkpoint and when the run ends (so a killed run's TensorBoard
view may lack its last seconds, never a step its checkpoint holds; `metrics.jsonl` is flushed per line). Every
other tracker is Accelerate's, by name.
"""

from __future__ import annotations

import numbers
import time
from pathlib import Path
from typing import Any

from accelerate.tracking import GeneralTracker, TensorBoardTracker, on_main_process

FLUSH_SECS = 10.0


class TensorBoard(TensorBoardTracker):
    def __init__(self, logging_dir: str, resumed_at: int | None = None):
        # A resumed run continues after `resumed_at`: TensorBoard's reader drops what an earlier attempt logged
        # after that step (it was rolled back), so every step has the values of the attempt that went on from it.
        purge = {} if resumed_at is None else {"purge_step": resumed_at + 1}
        super().__init__("tensorboard", logging_dir, max_queue=1000, flush_secs=3600, **purge)
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

    @on_main_process
    def store_init_configuration(self, values: dict[str, Any]) -> None:
        """The recipe as TensorBoard HPARAMS, in the run's own event file, with train and val loss as its metrics
        (Accelerate's writes them into a separate run of their own, apart from the scalars they describe)."""
        from torch.utils.tensorboard.summary import hparams

        file_writer = self.writer._get_file_writer()
        for summary in hparams(values, {"train/loss": 0.0, "val/loss": 0.0}):
            file_writer.add_summary(summary)
        self.writer.flush()

    @on_main_process
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


def trackers(
    names: tuple[str, ...], logging_dir: str, resumed_at: int | None = None
) -> list[str | GeneralTracker] | None:
    """What `Accelerator(log_with=...)` gets for the recipe's `logging.trackers` (`jsonl` is the loop's own)."""
    out: list[str | GeneralTracker] = [
        TensorBoard(logging_dir, resumed_at) if name == "tensorboard" else name for name in names
    ]
    return [t for t in out if t != "jsonl"] or None


def tracker_options(run_dir: Path) -> dict[str, dict[str, Any]]:
    """Accelerate's `init_kwargs` per tracker: runs named after their run dir, wandb's files kept inside it."""
    return {"wandb": {"name": run_dir.name, "dir": str(run_dir)}, "mlflow": {"run_name": run_dir.name}}


def write_pending(active: list[GeneralTracker]) -> None:
    """Hand what the TensorBoard tracker holds to disk now: at a checkpoint, so that a run killed later and
    resumed from it has every step up to there in TensorBoard too."""
    for tracker in active:
        if isinstance(tracker, TensorBoard):
            tracker.write_pending()
