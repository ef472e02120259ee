"""The model inside the wrappers a strategy put around it, without paying for wrappers the run cannot have."""

from __future__ import annotations

import sys

import torch
from accelerate import Accelerator


def unwrap(accelerator: Accelerator, model: torch.nn.Module) -> torch.nn.Module:
    """The model inside its wrappers, as `accelerator.unwrap_model` gives it. Accelerate's helper imports DeepSpeed
    (where it is installed) to recognise its engine, and DeepSpeed imports packages of its own: about 2 s at the
    start of every run, DeepSpeed's or not. A model can only be DeepSpeed's engine once DeepSpeed is imported, and
    only FSDP's wrapper once FSDP is: until then the wrappers to peel are DDP's and DataParallel's. A compiled model
    goes to Accelerate's helper too, which keeps the compiled wrapper around what it unwraps."""
    if sys.modules.get("deepspeed") is not None or hasattr(model, "_orig_mod"):
        return accelerator.unwrap_model(model)
    wrappers: tuple[type, ...] = (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)
    fsdp = sys.modules.get("torch.distributed.fsdp")
    if fsdp is not None:
        wrappers += (fsdp.FullyShardedDataParallel,)
    while isinstance(model, wrappers):
        model = model.module
    return model
