"""The trackers a run logs to, as Accelerate takes them (`Accelerator(log_with=...)`).

TensorBoard is Accelerate's own tracker with a cheaper `log`. Accelerate's writes one event per value and flushes
at every call, which hands the events to TensorBoard's writer thread and waits for it: with its pure-Python
checksums that thread then competes with training for the interpreter, and logging every 10 steps cost a fast
loop several percent of its speed. Here each call keeps its scalars as one event in memory, and the events go to
the writer together every `FLUSH_SECS`, at every checkpoint and when the run ends (so a killed run's TensorBoard
view may lack its last seconds, never a step its checkpoint holds; `metrics.jsonl` is flushed per line).

W&B and MLflow are Accelerate's trackers, made to continue their run across attempts (see `tracker_runs.py`).
Every other tracker is Accelerate's, by name.
"""

from __future__ import annotations

import numbers
import sys
import time
from pathlib import Path
from typing import Any

from accelerate.tracking import GeneralTracker, MLflowTracker, TensorBoardTracker, WandBTracker, on_main_process

from launcher import tracker_runs
from launcher.layout import TRACKERS_FILE

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


class MLflow(MLflowTracker):
    """Accelerate's MLflow tracker, continuing the run `run_id` (where the tracking store still has it) with only
    the steps it lacks."""

    def __init__(self, experiment: str, run_name: str, run_id: str | None):
        super().__init__(experiment, run_id=run_id, run_name=run_name)
        self.held_through: int | None = None  # None: a run of this attempt's own, which gets every step
        self.stored_params: dict[str, str] = {}

    @on_main_process
    def start(self) -> None:
        if self.run_id and not tracker_runs.mlflow_run_exists(self.run_id):
            # The metrics are in the run dir still: losing the view of them is no reason to stop the training.
            print(f"warning: MLflow has no run {self.run_id} (in {TRACKERS_FILE}); logging to a new run",
                  file=sys.stderr, flush=True)  # fmt: skip
            self.run_id = None
        continued = self.run_id
        super().start()
        if continued:
            self.held_through = tracker_runs.mlflow_last_step(continued)
            self.stored_params = tracker_runs.mlflow_params(continued)

    @property
    def run_ids(self) -> dict[str, str]:
        return {"mlflow": self.active_run.info.run_id}

    @on_main_process
    def store_init_configuration(self, values: dict[str, Any]) -> None:
        # MLflow refuses to change a stored param: a continued run keeps those of the attempt that stored them.
        super().store_init_configuration({k: v for k, v in values.items() if k not in self.stored_params})

    @on_main_process
    def log(self, values: dict[str, Any], step: int | None = None, **kwargs: Any) -> None:
        if tracker_runs.sends(step, self.held_through):
            super().log(values, step, **kwargs)


class WandB(WandBTracker):
    """Accelerate's W&B tracker, its files in the run dir, continuing the run `run_id` with only the steps it
    lacks."""

    def __init__(self, project: str, run_dir: Path, run_id: str | None):
        resume = {"id": run_id, "resume": "allow"} if run_id else {}
        super().__init__(project, name=run_dir.name, dir=str(run_dir), **resume)
        self.continued = run_id
        self.held_through: int | None = None

    @on_main_process
    def start(self) -> None:
        super().start()
        if self.continued:
            held = tracker_runs.wandb_last_step(Path(self.run.dir).parents[1], self.run.id)
            # Online, W&B resumes at the step after its server's last and drops lower ones itself; say so here
            # rather than be warned at every one of them.
            self.held_through = max(held, self.run.step - 1 if self.run.resumed else -1)

    @property
    def run_ids(self) -> dict[str, str]:
        return {"wandb": self.run.id}

    @on_main_process
    def log(self, values: dict[str, Any], step: int | None = None, **kwargs: Any) -> None:
        if tracker_runs.sends(step, self.held_through):
            super().log(values, step, **kwargs)


def trackers(
    names: tuple[str, ...], run_dir: Path, project: str, resumed_at: int | None, ids: dict[str, str]
) -> list[str | GeneralTracker] | None:
    """What `Accelerator(log_with=...)` gets for the recipe's `logging.trackers` (`jsonl` is the loop's own). The
    recipe's name is the wandb project and MLflow experiment, the run dir's name the run's; `ids`: the W&B and
    MLflow runs to continue."""

    def make(name: str) -> str | GeneralTracker:
        if name == "tensorboard":
            return TensorBoard(str(run_dir), resumed_at)
        if name == "mlflow":
            return MLflow(project, run_dir.name, ids.get("mlflow"))
        if name == "wandb":
            return WandB(project, run_dir, ids.get("wandb"))
        return name

    return [t for t in map(make, names) if t != "jsonl"] or None


def run_ids(active: list[GeneralTracker]) -> dict[str, str]:
    """The ids of the W&B and MLflow runs the trackers log to, for the attempts that continue the run."""
    out: dict[str, str] = {}
    for tracker in active:
        if isinstance(tracker, (MLflow, WandB)):
            out.update(tracker.run_ids)
    return out


def backfill(active: list[GeneralTracker], rows: list[dict[str, Any]], resumed_at: int) -> None:
    """Send each continued tracker run the rows of `metrics.jsonl` it lacks up to `resumed_at`: those a killed
    attempt logged but the tracker never stored (W&B's last unwritten records)."""
    for tracker in active:
        held = getattr(tracker, "held_through", None)
        if isinstance(tracker, (MLflow, WandB)) and held is not None:
            for step, values in tracker_runs.backfill(rows, held, resumed_at):
                tracker.log(values, step)


def write_pending(active: list[GeneralTracker]) -> None:
    """Hand what the TensorBoard tracker holds to disk now: at a checkpoint, so that a run killed later and
    resumed from it has every step up to there in TensorBoard too."""
    for tracker in active:
        if isinstance(tracker, TensorBoard):
            tracker.write_pending()
