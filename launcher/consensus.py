"""Every decision that could differ between ranks goes through one collective here, so all ranks act alike.

Per-rank facts are reduced into one verdict that every rank then acts on at the same step:
- a non-finite loss rides on the gradient all-reduce the step does anyway: a rank whose loss is not finite makes
  its gradients NaN (`poison_nonfinite`), so the synchronised gradients, and the global norm every rank computes
  from them, are not finite on every rank, and every rank skips the update. With a fused optimizer the skip is
  left to the optimizer on the device, and the host reads which updates were skipped only now and then (see
  `StepAgreement`);
- requests to stop (a signal, the wall-time budget, a stop file) are reduced by an all-reduce of a few flags,
  about once a second at a step every rank knows in advance (`StopChecks`): at every step it would cost a small
  model's loop a sizeable share of its speed. With fp16, whose loss scaler makes overflowing gradients normal,
  the loss's own flag goes into that all-reduce, at every step.
Signal handlers only record the request; all work happens in the loop.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from types import FrameType

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from launcher.errors import RecipeError, RunFailed

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


# Why a run stops, as codes small enough to all-reduce; when ranks differ, the highest code is the verdict.
STOP_REASONS = ("", "max_time_s reached", "stop file", "SIGINT", "SIGUSR1", "SIGTERM")
STOP_FILE = "STOP"  # created in a run dir (by hand, or by a SLURM job warned of its end): the run stops and saves


@dataclass(frozen=True)
class Verdict:
    stop_code: int  # why some rank was asked to stop (an index into STOP_REASONS); 0: nobody was
    skip_step: bool  # some rank saw a non-finite loss or gradient norm: no rank applies this update
    next_check_in: int = 1  # steps until the ranks next agree on stopping
    # Decided on the device (skip_step is then False): the skip as a 0-d bool tensor the optimizer reads, the same
    # on every rank, which the host does not read during the step.
    skip_on_device: torch.Tensor | None = None
    read_skips: bool = False  # on the device path: the host reads the skips decided since the last read now

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
    """Every rank's SHA-256 of its parameters' bytes (`model`: unwrapped, see `strategies.unwrap`), gathered on
    every rank. Data-parallel replicas must agree bit for bit; a difference means some rank applied an update the
    others did not."""
    digest = hashlib.sha256()
    for p in model.parameters():
        digest.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    mine = digest.hexdigest()[:16]
    return list(gather_object([mine])) if accelerator.num_processes > 1 else [mine]


class StepAgreement:
    """The per-update agreement, the one thing the loop asks at every step boundary: whether this update is
    skipped (a non-finite loss or gradient norm on some rank) and whether to stop (some rank was asked to).

    The norm of the synchronised gradients is the same on every rank, and not finite on every rank if any rank's
    loss or gradients were not (a rank's non-finite loss is made to poison its gradients: `poisons`). With fp16,
    whose loss scaler makes overflowing gradients normal, only a non-finite loss is divergence, and only this
    rank's: it goes into the all-reduce, which then happens at every step. Otherwise the ranks agree on stopping
    about once a second (`StopChecks`). A single process watches its loss and norm together (one sum is finite
    only if both are) and reads its stop requests at every step.

    On the device path (`on_device`: a fused optimizer skips the update itself, see `Stepper.skips_on_device`)
    the finiteness is never read on the host during the step: the verdict hands it to the optimizer as a device
    flag, and says at which steps the host reads the flags gathered since the last read (`read_skips`): with
    several processes at each agreement on stopping (about once a second, the same step on every rank), with one
    about once a second of its own. Every rank's flag is the same without a collective: it comes from the norm
    of the synchronised gradients, the same bit for bit on every rank."""

    def __init__(self, accelerator: Accelerator, fp16: bool, requests: StopRequests, peers: LostPeers):
        self.several = accelerator.num_processes > 1
        self.accelerator = accelerator
        self.fp16 = fp16
        self.poisons = self.several and not fp16
        self.requests = requests
        self.peers = peers
        self.checks = StopChecks(every_s=1.0 if self.poisons else 0.0)
        self.reads = StopChecks(every_s=1.0)  # one process on the device path: when to read the skips

    def verdict(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor, on_device: bool = False) -> Verdict:
        """The verdict on the update closing at `step` (0-based), from this update's loss and gradient norm;
        `on_device`: the optimizer can skip the update on the device (never with fp16). There the flag stays on
        the device, out of the host's verdict, and the ranks agree on stopping as on the host path."""
        watched = loss if self.fp16 else grad_norm if self.poisons else grad_norm + loss
        if not (self.several or on_device):  # one process on the host path: no one to agree with, nothing to time
            return Verdict(stop_code=self.requests.code(), skip_step=not torch.isfinite(watched).item())
        nonfinite = ~torch.isfinite(watched)
        on_host = False if on_device else nonfinite
        agreeing = self.checks.due(step)
        if agreeing:
            with self.peers.waiting_for("the other processes' step verdict"):
                proposal = self.checks.proposal(step)
                verdict = agree(self.accelerator, self.requests.code(), on_host, proposal)
            self.checks.agreed(step, verdict.next_check_in)
        else:
            verdict = Verdict(stop_code=0, skip_step=bool(on_host))
        if not on_device:
            return verdict
        read = agreeing and (self.several or self.reads.due(step))
        if read and not self.several:
            self.reads.agreed(step, self.reads.proposal(step))
        return replace(verdict, skip_on_device=nonfinite, read_skips=read)


class LostPeers:
    """What this rank waits for at each phase of the loop, so that a collective that fails because another
    process died or hung ends the run with one line naming it, instead of a traceback from inside gloo or NCCL."""

    def __init__(self, accelerator: Accelerator, timeout_s: float):
        self.accelerator = accelerator
        self.timeout_s = timeout_s
        self.phase = "the first batch"

    def waiting_for(self, phase: str) -> Phase:
        return Phase(self, phase)

    def each(self, batches: Iterator, phase: str = "the next batch") -> Iterator:
        """`batches`, with each fetch a phase of its own (a sampler or dataset may hold a collective)."""
        iterator = iter(batches)
        while True:
            with self.waiting_for(phase):
                batch = next(iterator, _END)
            if batch is _END:
                return
            yield batch

    @contextlib.contextmanager
    def watch(self, step: Callable[[], int]) -> Iterator[None]:
        try:
            yield
        except (torch.distributed.DistError, RuntimeError) as e:
            if self.accelerator.num_processes == 1 or not lost_peer(e):
                raise
            raise RunFailed(
                f"error: rank {self.accelerator.process_index}: at step {step()}, gave up waiting for {self.phase}: "
                f"another process died or hung ({first_line(e)}); strategy.timeout_s={self.timeout_s:g}"
            ) from None


_END = object()


class Phase:
    """`LostPeers.waiting_for`'s context: the phase named while inside, the outer one after. A class rather than a
    generator: it is entered two or three times at every update, and this costs a fraction of a generator's
    context."""

    __slots__ = ("outer", "peers", "phase")

    def __init__(self, peers: LostPeers, phase: str):
        self.peers, self.phase = peers, phase

    def __enter__(self) -> None:
        self.outer, self.peers.phase = self.peers.phase, self.phase

    def __exit__(self, *exc: object) -> None:
        self.peers.phase = self.outer


def lost_peer(e: BaseException) -> bool:
    """Whether a collective failed because another process went away or stopped answering."""
    if isinstance(e, torch.distributed.DistError):
        return True
    text = str(e).lower()
    return any(s in text for s in ("gloo", "nccl", "connection", "timed out", "timeout", "socket", "peer"))


def first_line(e: BaseException) -> str:
    lines = [line for line in str(e).splitlines() if line.strip()]
    return lines[0][:200] if lines else type(e).__name__


def refuse_together(accelerator: Accelerator, refusal: list[str]) -> None:
    """Refuse on every rank if any refused before the process group started (another run holding the run dir,
    which only the main process knows; checkpoints another run changed between two processes' looks): the first
    rank that refused says why, and all leave together (a rank gone while another still reads the verdict would
    make that one fail with a traceback). A rank that refused refuses whatever becomes of the collective."""
    if accelerator.num_processes == 1:
        if refusal:
            raise RecipeError(refusal)
        return
    try:
        refused = gather_object([bool(refusal)])
        if any(refused):
            accelerator.wait_for_everyone()
    except (torch.distributed.DistError, RuntimeError):
        if not refusal:
            raise
        raise RecipeError(refusal) from None
    if not any(refused):
        return
    if refusal and refused.index(True) == accelerator.process_index:
        raise RecipeError(refusal)
    raise RunFailed("", exit_code=2)


def refuse_uneven_data(accelerator: Accelerator, train_batches: int | None, val_batches: int) -> None:
    """Refuse, before the first step, data that gives no batch (an epoch would never end) or gives the processes
    different numbers of batches (a dataset that shards itself unevenly): the longer ones would wait at a
    collective for the shorter ones until the timeout. `train_batches` None: a stream, endless on every rank;
    `val_batches`: those an evaluation reads."""
    main = accelerator.is_main_process
    if train_batches == 0:  # the same on every rank unless the data is uneven, which the check below names
        raise RunFailed(
            "error: data.train: no batch to train on (fewer samples per process than train.batch_size with "
            "data.drop_last); give more samples, a smaller batch_size or drop_last=false"
            if main
            else "",
            exit_code=2,
        )
    if accelerator.num_processes == 1:
        return
    lengths = gather_object([(train_batches, val_batches)])
    if len(set(lengths)) == 1:
        return
    accelerator.wait_for_everyone()  # every rank has the counts before any leaves
    key, which = ("data.train", 0) if len({n[0] for n in lengths}) > 1 else ("data.val", 1)
    counts = ", ".join(f"rank {rank}: {n[which]}" for rank, n in enumerate(lengths))
    raise RunFailed(
        f"error: {key}: the processes have different numbers of batches ({counts}); every process must get as "
        "many (a dataset that shards itself must give each rank the same length), or they would wait for each "
        "other forever"
        if main
        else "",
        exit_code=2,
    )
