"""Every decision that could differ between ranks goes through one collective here, so all ranks act alike.

Per-rank facts (a signal arrived, the wall-time budget ran out, this rank's loss or gradient norm is not finite)
are reduced into one verdict at each step boundary by a single all-reduce of a few flags; every rank then acts on
the same verdict at the same step. Signal handlers only record the request; all work happens in the loop.
"""

from __future__ import annotations

import hashlib
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

    @property
    def stop(self) -> bool:
        return self.stop_code > 0

    @property
    def stop_reason(self) -> str:
        return STOP_REASONS[self.stop_code]


def agree(accelerator: Accelerator, stop: int | bool, nonfinite: torch.Tensor | bool) -> Verdict:
    """The step's verdict, the same on every rank: one all-reduce (max) of the flags, one host sync."""
    if accelerator.num_processes == 1:  # nothing to agree on: the flags as they are
        return Verdict(stop_code=int(stop), skip_step=bool(nonfinite))
    flags = torch.stack([torch.as_tensor(int(stop)), torch.as_tensor(nonfinite).to(torch.int64)])
    flags = flags.to(accelerator.device, torch.int32)
    torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
    stop_code, skip_any = flags.tolist()
    return Verdict(stop_code=stop_code, skip_step=bool(skip_any))


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
