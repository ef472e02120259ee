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
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

_PLAIN = (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)


class Stepper:
    def __init__(self, accelerator: Accelerator, model: torch.nn.Module, optimizer: Any, strategy: str):
        self.accelerator = accelerator
        self.model = model
        self.direct = strategy == "ddp" and accelerator.scaler is None and accelerator.distributed_type in _PLAIN
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


def plain_norm(norm: Any) -> torch.Tensor:
    """The gradient norm as a plain tensor: FSDP's is a replicated DTensor, DeepSpeed's a float (None before its
    first step)."""
    if norm is None:
        return torch.tensor(math.nan)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return torch.as_tensor(norm).detach().float()
