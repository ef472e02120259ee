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


class MeshStepper(ShardedStepper):
    """FSDP2 over the data-parallel ranks and tensor parallelism within each group (`strategy.tp`): the gradients
    are DTensors on two meshes (the split weights on both dimensions, the rest on the data-parallel one), whose
    global norm torch's clipping does not take in one piece (see `mesh_norm`)."""

    def clip(self, max_norm: float | None) -> torch.Tensor:
        grads = [p.grad for p in self.parameters if p.grad is not None]
        norm = mesh_norm(grads)
        if max_norm is not None:
            coefficient = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
            locals_ = [g.to_local() if hasattr(g, "to_local") else g for g in grads]
            torch._foreach_mul_(locals_, coefficient.to(locals_[0].device))
        return norm.detach().float()


def mesh_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of all gradients as one vector, on every process alike, in one all-reduce: each process sums
    the squares of its local shards, each divided by the number of processes holding a copy of that shard (a
    dimension of the mesh the gradient is replicated on, or the tensor-parallel ranks beside a data-parallel-only
    mesh), so that the world's sum counts every element once."""
    import torch.distributed as dist

    world = dist.get_world_size()
    by_copies: dict[int, list[torch.Tensor]] = {}
    for g in grads:
        local, copies = local_shard(g, world)
        by_copies.setdefault(copies, []).append(local)
    device = grads[0].device if grads else torch.device("cpu")
    total = torch.zeros((), dtype=torch.float32, device=device)
    for copies, locals_ in by_copies.items():
        norms = torch._foreach_norm(locals_)
        total = total + torch.stack([n.float() for n in norms]).pow(2).sum() / copies
    dist.all_reduce(total)
    return total.sqrt()


def local_shard(grad: torch.Tensor, world: int) -> tuple[torch.Tensor, int]:
    """A gradient's local tensor, and how many processes of the `world` hold the same one."""
    placements = getattr(grad, "placements", None)
    if placements is None:
        return grad, world  # a plain tensor: whole, and alike, on every process
    if any(p.is_partial() for p in placements):  # partial sums are not a shard: reduce them first
        grad = grad.redistribute(placements=[_replicate() if p.is_partial() else p for p in placements])
    shards = 1
    for dim, p in enumerate(grad.placements):
        if not p.is_replicate():  # Shard, or FSDP's strided shard of a tensor-parallel one
            shards *= grad.device_mesh.size(dim)
    return grad.to_local(), world // shards


def _replicate() -> Any:
    from torch.distributed.tensor import Replicate

    return Replicate()


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
