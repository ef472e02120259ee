"""The mechanics of one update for the loop: the accumulation context, backward, clip (returning the global
norm), step, zero the gradients.

Accelerate's wrappers do real work for DeepSpeed (its engine owns backward, clipping and the step), for FSDP
(DTensor-aware clipping) and for fp16 (the loss scaler). For everything else (one process, or DDP, in full
precision or bf16 autocast) they add only a fixed cost to every step: package look-ups in the optimizer's `step`,
signature inspection in its `zero_grad`, a division of the loss by 1, an accumulation context where every
micro-batch is an update. On a small model that is a sizeable share of the step, so there the same calls go
straight to torch. The results are the same bit for bit: after DDP's
all-reduce every rank holds the global gradient, and torch's own clipping is what Accelerate calls in the end.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from accelerate import Accelerator

from launcher.consensus import poison_nonfinite


class Stepper:
    """One update's mechanics; `direct` (the strategy decides: see `DDP.stepper`) goes straight to torch."""

    def __init__(self, accelerator: Accelerator, model: torch.nn.Module, optimizer: Any, direct: bool = False):
        self.accelerator = accelerator
        self.model = model
        self.direct = direct
        # What the scheduler drives: the optimizer whose `step` runs, so torch sees each step it schedules.
        self.optimizer = optimizer.optimizer if self.direct else optimizer
        self.accumulation = accelerator.gradient_accumulation_steps
        self.parameters = [p for p in model.parameters() if p.requires_grad]

    def accumulate(self) -> contextlib.AbstractContextManager[None]:
        """Accelerate's accumulation context (which syncs gradients only on an update's last micro-batch), or
        nothing where every micro-batch is an update."""
        if self.direct and self.accumulation == 1:
            return contextlib.nullcontext()
        return self.accelerator.accumulate(self.model)

    def micro_step(self, forward: Callable[[], torch.Tensor], poison: bool) -> torch.Tensor:
        """Forward (`forward` returns the loss) and backward of one micro-batch, in the accumulation context;
        with `poison`, a non-finite loss makes every gradient NaN (see `consensus.poison_nonfinite`)."""
        with self.accumulate():
            loss = forward()
            self.backward(poison_nonfinite(loss) if poison else loss)
        return loss

    def backward(self, loss: torch.Tensor) -> None:
        if not self.direct:
            self.accelerator.backward(loss)
        elif self.accumulation > 1:
            (loss / self.accumulation).backward()
        else:
            loss.backward()

    def clip(self, max_norm: float | None) -> torch.Tensor:
        """Clip to `max_norm` (None: only measure); the global norm before clipping, as a plain float tensor."""
        limit = max_norm or math.inf
        if self.direct:
            return torch.nn.utils.clip_grad_norm_(self.parameters, limit).detach().float()
        return plain_norm(self.accelerator.clip_grad_norm_(self.model.parameters(), limit))

    def step(self) -> None:
        self.optimizer.step()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)


class ShardedStepper(Stepper):
    """FSDP2 has no `no_sync()`: the reduce-scatter is switched on only for an update's last micro-batch."""

    @contextlib.contextmanager
    def accumulate(self) -> Iterator[None]:
        with self.accelerator.accumulate(self.model):
            self.model.set_requires_gradient_sync(self.accelerator.sync_gradients)
            yield


def plain_norm(norm: Any) -> torch.Tensor:
    """The gradient norm as a plain tensor: FSDP's is a replicated DTensor, DeepSpeed's a float (None before its
    first step)."""
    if norm is None:
        return torch.tensor(math.nan)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return torch.as_tensor(norm).detach().float()
