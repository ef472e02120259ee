"""Memory accounting shared by the strategies: bytes of parameters, gradients and optimizer state per process,
as in the ZeRO paper (activations and transient all-gather buffers not counted)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def optimizer_slots(optimizer_name: str, kwargs: Mapping[str, Any]) -> int:
    """Tensors of parameter size an optimizer keeps per parameter (Adam: 2 moments; SGD: momentum or none)."""
    name = optimizer_name.rsplit(".", 1)[-1].lower()
    if name == "sgd":
        return 1 if kwargs.get("momentum", 0) else 0
    if name in ("adagrad", "rmsprop", "adadelta"):
        return 1 if name != "adadelta" else 2
    return 2  # adam, adamw, nadam, radam, adamax, lamb...


def state_bytes(parameters: int, slots: int, half_master: bool) -> dict[str, float]:
    """The whole training state's bytes: fp32 parameters and gradients (autocast or FSDP's MixedPrecisionPolicy
    computes in 16 bits), or with `half_master` 16-bit ones plus an fp32 master copy in the optimizer state
    (DeepSpeed with 16-bit precision)."""
    if half_master:
        return {"parameters": 2 * parameters, "gradients": 2 * parameters, "optimizer": (4 + 4 * slots) * parameters}
    return {"parameters": 4 * parameters, "gradients": 4 * parameters, "optimizer": 4 * slots * parameters}


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**27 else f"{n / 2**20:.1f} MiB"
