"""One update at a time: each micro-batch forward and backward; at the update's last one, the ranks' verdict,
the optimizer step (or its skip), the schedule and the counters; and the row a log line shows, whose learning
rates are those its last update used (`lr` the default groups', `lr/<name>` each recipe group's).

With a fused optimizer the skip is decided on the device (`Stepper.skips_on_device`): each update's flag, loss and
micro-batches wait in `pending` until the host reads the flags (`read_skips`: at log, evaluation and save steps,
where the run may stop, and about once a second), and are then counted in order exactly as the host path counts
them at each update: the counters, the loss window, the warning and the divergence come out the same, later.
"""

from __future__ import annotations

import contextlib
import math
import sys
from typing import Any, NamedTuple

import torch
from accelerate import Accelerator

from launcher import batches, param_groups
from launcher.build import Parts
from launcher.consensus import StepAgreement, Verdict
from launcher.errors import Throttled
from launcher.flops import FlopMeter, compiled
from launcher.metrics import Throughput, peak_memory
from launcher.progress import Progress
from launcher.strategies import unwrap
from launcher.trainstate import LogWindow, TrainState

NOT_COUNTING = contextlib.nullcontext()
FLOPS_NOTE = (
    "note: flops_per_s and mfu are not logged: a compiled model's FLOPs are not counted (counting would change "
    "its numbers); a model method flops_per_token(seq_len) or flops_per_sample() gives them"
)


class Pending(NamedTuple):
    """An update whose skip was decided on the device and not read on the host yet."""

    step: int  # the state's step before it (0-based)
    skip: torch.Tensor  # 0-d bool, on the device
    loss: torch.Tensor  # summed over its micro-batches
    batches: int


class Updates:
    def __init__(
        self,
        accelerator: Accelerator,
        parts: Parts,
        scheduler: Any,
        agreement: StepAgreement,
        state: TrainState,
        window: LogWindow,
        progress: Progress,
        throughput: Throughput,
        max_nonfinite_steps: int,
        clip_grad_norm: float | None,
    ):
        self.accelerator, self.parts, self.scheduler, self.agreement = accelerator, parts, scheduler, agreement
        self.state, self.window, self.progress = state, window, progress
        self.max_nonfinite_steps, self.clip_grad_norm = max_nonfinite_steps, clip_grad_norm
        self.throughput = throughput
        self.skipped_notices = Throttled(every_s=10.0)
        self.loss = torch.zeros((), device=accelerator.device)  # summed over the micro-batches of the current update
        self.batches = 0
        self.grad_norm = torch.zeros(())
        # The first update's FLOPs are counted (or taken from the model's formula); after it, nothing is. A resumed
        # run takes the count of the run it continues: counting dispatches some operations (attention) otherwise,
        # which changes that update's numbers in their last bits, and the resumed run would not match.
        self.meter: FlopMeter | None = FlopMeter(unwrap(accelerator, parts.model), not compiled(parts.model))
        if state.flops_per_update is not None:
            throughput.measured(state.flops_per_update)
            self.meter = None
        self.logged_step = state.step
        self.pending: list[Pending] = []  # the device path's updates since the host last read their skips
        self.lrs = self.current_lrs()  # each param group's rate in the last update (see `update`)
        self.diverged_streak = 0  # the streak that reached max_nonfinite_steps, once one did

    def micro_step(self, inputs: Any, targets: Any) -> bool:
        """Forward and backward of one micro-batch; True when it closes an update (gradients are synchronised)."""
        p, world = self.parts, self.parts.data_ranks
        # A non-finite loss makes this rank's gradients NaN, and through their all-reduce every rank's (see
        # StepAgreement).
        with self.meter.counting(batches.token_inputs(inputs)) if self.meter is not None else NOT_COUNTING:
            loss = p.stepper.micro_step(lambda: self.forward(inputs, targets), self.agreement.poisons)
        self.loss = loss.detach() if self.batches == 0 else self.loss + loss.detach()
        self.batches += 1
        self.throughput.add(batches.samples(inputs, targets) * world, batches.sequence_tokens(targets) * world)
        if self.meter is not None and self.accelerator.sync_gradients:
            per_update = self.meter.per_update
            if per_update is not None:  # a tensor-parallel group shares its data rank's work (the model's FLOPs)
                per_update *= world / self.accelerator.num_processes
            self.throughput.measured(per_update)
            self.state.flops_per_update = per_update
            if self.meter.unknown and self.accelerator.is_main_process:
                self.progress.write(FLOPS_NOTE, file=sys.stderr)
            self.meter = None
        return self.accelerator.sync_gradients

    def forward(self, inputs: Any, targets: Any) -> torch.Tensor:
        """One micro-batch's loss, forward and loss in one autocast region (see launcher/precision.py), the
        model's outputs reaching the loss in the precision they were computed in."""
        p = self.parts
        with p.precision.forward():
            return batches.micro_batch_loss(p.model, p.loss_fn, inputs, targets, p.chunked, p.precision.loss)

    def update(self) -> Verdict:
        """Close the update: the global gradient norm (after unscaling; inf measures without clipping; logged as
        it was before clipping; DeepSpeed clips inside its step and reports it), the verdict, then the step or
        its skip."""
        stepper, state = self.parts.stepper, self.state
        self.grad_norm = stepper.clip(self.clip_grad_norm)
        verdict = self.agreement.verdict(state.step, self.loss, self.grad_norm, stepper.skips_on_device())
        if verdict.skip_on_device is not None:
            stepper.step(skip=verdict.skip_on_device)
            self.pending.append(Pending(state.step, verdict.skip_on_device, self.loss, self.batches))
        elif verdict.skip_step:
            self._skipped(state.step)
            if self.accelerator.scaler is not None:
                self.accelerator.scaler.update()  # closes the step that unscale_ opened, without applying it
        else:
            stepper.step()
            self._applied(self.loss, self.batches)
        stepper.zero_grad()
        self.batches = 0
        # The rates this update used: after the schedule's step the groups hold the next update's.
        self.lrs = self.current_lrs()
        self.scheduler.step()
        state.step += 1
        self.progress.update(1)
        if verdict.read_skips:
            self.read_skips()
        return verdict

    def current_lrs(self) -> list[Any]:
        """Each param group's learning rate now; a tensor one copied (the scheduler fills it in place), on its
        device, so that no update waits for the host to read it."""
        lrs = [group["lr"] for group in self.parts.stepper.optimizer.param_groups]
        return [lr.detach().clone() if isinstance(lr, torch.Tensor) else lr for lr in lrs]

    def read_skips(self) -> None:
        """The device path: read which updates since the last read were skipped (one host sync), and count them
        in order as the host path counted each at its step. Nothing to do on the host path."""
        if not self.pending:
            return
        pending, self.pending = self.pending, []
        skipped = torch.stack([update.skip for update in pending]).tolist()
        for update, skip in zip(pending, skipped, strict=True):
            if skip:
                self._skipped(update.step)
            else:
                self._applied(update.loss, update.batches)

    def _applied(self, loss: torch.Tensor, batches: int) -> None:
        self.state.nonfinite_streak = 0
        self.window.add(loss, batches)

    def _skipped(self, step: int) -> None:
        """Count the update closing at `step` (0-based) as skipped, and say so (throttled)."""
        state = self.state
        state.skipped_steps += 1
        state.nonfinite_streak += 1
        if state.nonfinite_streak >= self.max_nonfinite_steps:
            self.diverged_streak = state.nonfinite_streak
        if self.accelerator.is_main_process:
            self.skipped_notices.say(
                f"warning: step {step + 1}: update skipped: the loss or gradient norm is not finite "
                f"({state.nonfinite_streak} in a row; {self.max_nonfinite_steps} in a row stop the run)",
                write=lambda line: self.progress.write(line, file=sys.stderr),
            )

    @property
    def diverged(self) -> bool:
        """Whether max_nonfinite_steps updates in a row were skipped, as far as the host knows: on the device path
        as of the last `read_skips` (a streak that reached the limit counts though updates were applied since)."""
        return max(self.diverged_streak, self.state.nonfinite_streak) >= self.max_nonfinite_steps

    def row(self, samples_per_epoch: int) -> dict[str, float]:
        """The values of a log line: the loss averaged over the ranks and the updates since the last line."""
        self.read_skips()
        state = self.state
        train_loss = self.accelerator.reduce(self.window.take_mean(self.loss), reduction="mean").item()
        rates = param_groups.rates(self.parts.rate_keys, self.lrs)
        values = {
            "train/loss": train_loss,
            **rates,
            "grad_norm": float(self.grad_norm),
            # samples_per_epoch 0: a stream, which has no epochs
            **({"epoch": state.epoch + state.samples_in_epoch / samples_per_epoch} if samples_per_epoch else {}),
            "train/skipped_steps": state.skipped_steps,
            **self.throughput.rates(state.step - self.logged_step),
            **peak_memory(self.accelerator.device),
        }
        self.logged_step = state.step
        # Shown at the bar's next redraw: forcing one here would write a line to a log file each time.
        # The default groups' rate; where a recipe group takes every parameter, the first group's.
        shown = rates.get(param_groups.DEFAULT_RATE_KEY, next(iter(rates.values()), math.nan))
        self.progress.set_postfix(loss=f"{train_loss:.4f}", lr=f"{shown:.2e}", refresh=False)
        return values
