"""Every decision that could differ between ranks goes through one collective here, so all ranks act alike.

Per-rank facts are reduced into one verdict that every rank then acts on at the same step:
- a non-finite loss rides on the gradient all-reduce the step does anyway: a rank whose loss is not finite makes
  its gradients NaN (`poison_nonfinite`), so the synchronised gradients, and the global norm every rank computes
  from them, are not finite on every rank, and every rank skips the update;
- requests to stop (a signal, the wall-time budget, a stop file) are reduced by an all-reduce of a few flags,
  about once a second at a step every rank knows in advance (`StopChecks`): at every step it would cost a small
  model's loop a sizeable share of its speed. With fp16, whose loss scaler makes overflowing gradients normal,
  the loss's own flag goes into that all-reduce, at every step.
Signal handlers only record the request; all work happens in the loop.
"""

from __future__ import annotations

import hashlib
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


# Why a run stops, as codes small enough to all-reduce; when ranks differ, the highest code is the verdict.
STOP_REASONS = ("", "max_time_s reached", "stop file", "SIGINT", "SIGUSR1", "SIGTERM")
STOP_FILE = "STOP"  # created in a run dir (by hand, or by a SLURM job warned of its end): the run stops and saves


@dataclass(frozen=True)
class Verdict:
    stop_code: int  # why some rank was asked to stop (an index into STOP_REASONS); 0: nobody was
    skip_step: bool  # some rank saw a non-finite loss or gradient norm: no rank applies this update
    next_check_in: int = 1  # steps until the ranks next agree on stopping

    @property
    def stop(self) -> bool:
        return self.stop_code > 0

    @property
    def stop_reason(self) -> str:
        return STOP_REASONS[self.stop_code]


def agree(
    accelerator: Accelerator, stop: int | bool, nonfinite: torch.Tensor | bool, next_check_in: int = 1
) -> Verdict:
    """The verdict, the same on every rank: one all-reduce (max) of the flags, one host sync. `next_check_in` is
    this rank's proposal; the verdict's is the smallest any rank proposed."""
    if accelerator.num_processes == 1:  # nothing to agree on: the flags as they are
        return Verdict(stop_code=int(stop), skip_step=bool(nonfinite), next_check_in=next_check_in)
    flags = torch.tensor([int(stop), 0, -next_check_in], dtype=torch.int64, device=accelerator.device)
    flags[1] = torch.as_tensor(nonfinite, device=accelerator.device)  # stays on the device: one host sync, below
    torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
    stop_code, skip_any, next_check_in = flags.tolist()
    return Verdict(stop_code=stop_code, skip_step=bool(skip_any), next_check_in=-next_check_in)


def poison_nonfinite(loss: torch.Tensor) -> torch.Tensor:
    """`loss` to call backward on: itself times 1 (the same gradients, bit for bit) where it is finite, times NaN
    where it is not, so that every gradient it reaches is NaN however the loss went wrong, and the gradient
    all-reduce carries the news to every rank."""
    factor = torch.where(torch.isfinite(loss.detach()), 1.0, math.nan).to(loss.dtype)
    return loss * factor


class StopChecks:
    """When the ranks next agree on stopping: after as many steps as this rank's recent pace fits in `every_s`
    seconds (each agreement takes the smallest proposal, so every rank knows the step). A stop is acted on within
    about `every_s` seconds plus a step."""

    def __init__(self, every_s: float = 1.0):
        self.every_s = every_s
        self.next_step = 0
        self.since: tuple[int, float] | None = None  # (step, time) of the last agreement

    def due(self, step: int) -> bool:
        return step >= self.next_step

    def proposal(self, step: int) -> int:
        now = time.monotonic()
        last, self.since = self.since, (step, now)
        if last is None or step <= last[0]:
            return 1
        seconds_per_step = (now - last[1]) / (step - last[0])
        return steps_within(self.every_s, seconds_per_step)

    def agreed(self, step: int, next_check_in: int) -> None:
        self.next_step = step + next_check_in


def steps_within(seconds: float, seconds_per_step: float, most: int = 1000) -> int:
    """How many steps fit in `seconds` at the given pace: at least 1, at most `most`."""
    if seconds <= 0:
        return 1
    if seconds_per_step <= 0:
        return most
    return max(1, min(most, int(seconds / seconds_per_step)))


def any_rank(accelerator: Accelerator, flag: bool) -> bool:
    """True on every rank if it is true on any rank (one all-reduce of one number)."""
    return agree(accelerator, stop=flag, nonfinite=False).stop


class StopRequests:
    """Records SIGTERM, SIGUSR1 and SIGINT (the first of them; a second SIGINT interrupts at once), a wall-time
    budget, and a stop file appearing (looked for at most once a second), for the loop to read at the next step
    boundary."""

    def __init__(self, max_time_s: float | None = None, stop_file: Path | None = None):
        self.reason: str | None = None
        self.deadline = None if max_time_s is None else time.monotonic() + max_time_s
        self.previous: dict[int, object] = {}
        self.stop_file = stop_file
        self.next_look = 0.0

    def install(self) -> None:
        for sig in STOP_SIGNALS:
            self.previous[sig] = signal.signal(sig, self._record)

    def uninstall(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self.previous.clear()

    def _record(self, signum: int, frame: FrameType | None) -> None:
        if self.reason is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: the user means it
        if self.reason is None:
            self.reason = signal.Signals(signum).name

    def requested(self) -> bool:
        if self.reason is None and (self.deadline is not None or self.stop_file is not None):
            now = time.monotonic()
            if self.deadline is not None and now >= self.deadline:
                self.reason = STOP_REASONS[1]
            elif self.stop_file is not None and now >= self.next_look:
                self.next_look = now + 1.0
                if self.stop_file.exists():
                    self.reason = STOP_REASONS[2]
        return self.reason is not None

    def code(self) -> int:
        """This rank's reason to stop as an index into STOP_REASONS (0: none)."""
        return STOP_REASONS.index(self.reason) if self.requested() else 0


def replica_checksums(accelerator: Accelerator, model: torch.nn.Module) -> list[str]:
    """Every rank's SHA-256 of its parameters' bytes, gathered on every rank. Data-parallel replicas must agree
    bit for bit; a difference means some rank applied an update the others did not."""
    digest = hashlib.sha256()
    for p in accelerator.unwrap_model(model).parameters():
        digest.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    mine = digest.hexdigest()[:16]
    return list(gather_object([mine])) if accelerator.num_processes > 1 else [mine]
