"""The mechanics of one update for the loop: the accumulation context, backward, clip (returning the global
norm), step, zero the gradients.

Accelerate's wrappers do real work for DeepSpeed (its engine owns backward, clipping and the step), for FSDP
(DTensor-aware clipping) and for fp16 (the loss scaler). For everything else (one process, or DDP, in full
precision or bf16 autocast) they add only a fixed cost to every step: package look-ups in the optimizer's `step`,
signature inspection in its `zero_grad`, a division of the loss by 1, an accumulation context where every
micro-batch is an update. On a small model that is a sizeable share of the step, so there the same calls go
straight to torch. The results are the same bit for bit: after DDP's
all-reduce every rank holds the global gradient, and torch's own clipping is what Accelerate calls in the end.

A fused torch optimizer (`fused=True`) can skip an update on the device: its step reads a `found_inf` flag (as
GradScaler sets it) and leaves the parameters, its state and its step count as they were when the flag is 1, so
the host need not read whether the update is finite before stepping (`Stepper.step`).
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
    """One update's mechanics; `direct` (the strategy decides: see `DDP.stepper`) goes straight to torch;
    `device_skips`: whether the strategy lets the optimizer skip an update on the device (not where the update
    happens inside backward)."""

    def __init__(
        self,
        accelerator: Accelerator,
        model: torch.nn.Module,
        optimizer: Any,
        direct: bool = False,
        device_skips: bool = True,
    ):
        self.accelerator = accelerator
        self.model = model
        self.direct = direct
        # What the scheduler drives: the optimizer whose `step` runs, so torch sees each step it schedules.
        self.optimizer = optimizer.optimizer if self.direct else optimizer
        self.accumulation = accelerator.gradient_accumulation_steps
        self.parameters = [p for p in model.parameters() if p.requires_grad]
        self.inner = getattr(optimizer, "optimizer", optimizer)  # the torch optimizer under Accelerate's wrapper
        # Whether the optimizer skips on the device: known at the first update.
        self.fused_skip: bool | None = None if device_skips else False
        self.momentum_pending = False

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

    def skips_on_device(self) -> bool:
        """Whether this update's skip can be left to the optimizer on the device (`step(skip=...)`): a fused
        optimizer of `fused_skipping()` stepping the parameters where the flag is (not offloaded), without fp16's loss
        scaler (which sets the flag itself). Decided at the first update, after a resumed optimizer's state (whose
        param groups say whether it is fused) was loaded. Fused SGD with momentum waits until its momentum buffers
        exist: a skipped first step would leave them uninitialised (torch creates them empty before the kernel that
        would have filled them returns early)."""
        if self.fused_skip is None:
            device = torch.device(self.accelerator.device).type
            self.fused_skip = (
                self.accelerator.scaler is None
                and type(self.inner) in fused_skipping()
                and all(group.get("fused") for group in self.inner.param_groups)
                and all(p.device.type == device for p in self.parameters)
            )
            self.momentum_pending = isinstance(self.inner, torch.optim.SGD)
        if self.fused_skip and self.momentum_pending:
            self.momentum_pending = momentum_missing(self.inner)
            return not self.momentum_pending
        return self.fused_skip

    def step(self, skip: torch.Tensor | None = None) -> None:
        """The optimizer step; with `skip` (a 0-d bool tensor on the device, see `skips_on_device`) the fused
        kernel reads it and changes nothing where it is true, without the host reading it."""
        if skip is None:
            self.optimizer.step()
            return
        self.inner.found_inf = skip.to(torch.float32)  # what the fused kernels read (1.0: skip), as GradScaler sets
        try:
            self.optimizer.step()
        finally:
            del self.inner.found_inf

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)


class ShardedStepper(Stepper):
    """FSDP2 has no `no_sync()`: the reduce-scatter is switched on only for an update's last micro-batch."""

    @contextlib.contextmanager
    def accumulate(self) -> Iterator[None]:
        with self.accelerator.accumulate(self.model):
            self.model.set_requires_gradient_sync(self.accelerator.sync_gradients)
            yield


def fused_skipping() -> tuple[type, ...]:
    """The torch optimizers whose fused step skips everything when its `found_inf` is set: parameters, state and
    step count (torch/optim/adam.py `_fused_adam` undoes its step count; SGD keeps none). Adagrad's fused step
    counts a skipped step on some versions; user optimizers and subclasses may not read the flag at all: they keep
    the host's verdict."""
    return (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD)


def match_fused(optimizer: Any) -> None:
    """After a checkpoint's optimizer state was loaded. torch keeps the checkpoint's param groups, and with them
    whether the step is fused (a checkpoint written unfused, before fused was the CUDA default, keeps stepping
    unfused, bit for bit); but it sets the attribute GradScaler reads to hand the fused step its flags only when the
    optimizer is built. Made to agree with the groups, so that fp16 does not give an unfused step flags it refuses
    (and a fused one gets them)."""
    if type(optimizer) in fused_skipping():
        optimizer._step_supports_amp_scaling = all(group.get("fused") for group in optimizer.param_groups)


def momentum_missing(optimizer: torch.optim.Optimizer) -> bool:
    """Whether an SGD with momentum has yet to make a momentum buffer for a parameter that has a gradient."""
    return any(
        group["momentum"] != 0 and p.grad is not None and optimizer.state.get(p, {}).get("momentum_buffer") is None
        for group in optimizer.param_groups
        for p in group["params"]
    )


def plain_norm(norm: Any) -> torch.Tensor:
    """The gradient norm as a plain tensor: FSDP's is a replicated DTensor, DeepSpeed's a float (None before its
    first step)."""
    if norm is None:
        return torch.tensor(math.nan)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return torch.as_tensor(norm).detach().float()
