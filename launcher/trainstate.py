"""The counters a run keeps between steps and across a resume, and the per-rank window of losses not logged yet."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from launcher.early_stopping import Tracker


@dataclass
class TrainState:
    """The counters a resumed run needs to continue exactly where it stopped; saved as JSON in checkpoints."""

    step: int = 0  # optimizer updates done (skipped ones included: they consumed their batches)
    epoch: int = 0
    samples_in_epoch: int = 0  # samples of `epoch` already trained on, by all ranks: independent of world size
    skipped_steps: int = 0  # updates skipped for a non-finite loss or gradient norm, in all
    nonfinite_streak: int = 0  # of them, how many in a row up to now
    schedule_total: int = 0  # updates the learning-rate schedule spans (see plan.Budget)
    schedule_batch: int = 0  # samples one of them stands for; 0: the run counts updates (train.max_steps)
    schedule_position: float = 0.0  # the schedule's step at `step`
    log_windows: list[dict[str, Any]] = field(default_factory=list)  # per rank: losses not logged yet (see save)
    early_stopping: Tracker = field(default_factory=Tracker)
    best_checkpoints: list[list[float]] = field(default_factory=list)  # [step, metric], best first
    flops_per_update: float | None = None  # this process's, measured on the run's first update (see FlopMeter)
    decay: str = "all"  # the optimizer's weight-decay rule (param_groups); checkpoints that lack it used "all"

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> TrainState:
        values = {k: v for k, v in state.items() if k in {f.name for f in fields(cls)}}
        values["early_stopping"] = Tracker.from_state_dict(values["early_stopping"])
        return cls(**values)


@dataclass(frozen=True)
class RunResult:
    steps: int
    epochs_done: float
    stop_reason: str  # "done", "early stopping", or what asked the run to stop (SIGTERM, max_time_s reached)
    metrics: dict[str, float]
    run_dir: Path


class LogWindow:
    """The losses of the updates applied since the last log line, and their micro-batches, on this rank."""

    def __init__(self, losses: list[torch.Tensor] | None = None, batches: int = 0):
        self.losses = losses or []
        self.batches = batches

    def add(self, loss: torch.Tensor, batches: int) -> None:
        self.losses.append(loss)
        self.batches += batches

    def take_mean(self, like: torch.Tensor) -> torch.Tensor:
        """This rank's mean loss per micro-batch since the last line, and a fresh window; NaN when every update
        since then was skipped: there is no loss to show."""
        total = torch.stack(self.losses).sum() if self.losses else like.new_full((), float("nan"))
        mean = total / max(self.batches, 1)
        self.losses, self.batches = [], 0
        return mean

    def gathered(self, accelerator: Accelerator) -> list[dict[str, Any]]:
        """Every rank's window, for the checkpoint (float32 values are exact as JSON numbers)."""
        window = {
            "losses": torch.stack(self.losses).tolist() if self.losses else [],
            "dtype": str(self.losses[0].dtype).removeprefix("torch.") if self.losses else "float32",
            "batches": self.batches,
        }
        return list(gather_object([window])) if accelerator.num_processes > 1 else [window]

    @classmethod
    def restored(cls, state: TrainState, same_world: bool, accelerator: Accelerator) -> LogWindow:
        """This rank's window when the checkpoint was saved, so that a resumed run's next line averages the same
        steps as a run that never stopped; none on another world size (the ranks' shares of the data differ, and
        so do the rows)."""
        windows, state.log_windows = state.log_windows, []
        rank = accelerator.process_index
        if not same_world or rank >= len(windows):
            return cls()
        window = windows[rank]
        dtype = getattr(torch, window["dtype"])
        losses = [torch.tensor(v, dtype=dtype, device=accelerator.device) for v in window["losses"]]
        return cls(losses, int(window["batches"]))
