"""Mixed precision as a hand-written autocast loop has it: the model's forward and the loss both inside one
autocast region, the model's outputs handed to the loss in the precision they were computed in.

Accelerate's `prepare` wraps a model's forward in autocast and then in `convert_outputs_to_fp32`, which copies
every floating output to fp32. For a language model that copy is the (batch, time, vocabulary) logits: 4 bytes
a value, kept alive through the backward pass, with the loss's softmax then run in fp32 on it. The launcher
undoes both wrappers right after `prepare` (as Accelerate's own `unwrap_model(keep_fp32_wrapper=False)` does) and
runs forward and loss in `accelerator.autocast()` instead. The loss still computes where precision needs it:
autocast runs cross-entropy (its log-softmax) in fp32 on bf16 or fp16 logits, as it does in a hand-written loop.

Where Accelerate does not autocast (FSDP2 sharding with its own MixedPrecisionPolicy, DeepSpeed with its bf16 or
fp16 engine: the model itself computes in half precision) only the loss runs in an autocast region, so that it is
upcast there too instead of running its softmax in bf16.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from accelerate import Accelerator

HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}
NOTHING = contextlib.nullcontext()


def keep_output_precision(model: torch.nn.Module) -> bool:
    """Undo Accelerate's autocast and fp32-output wrappers of `model`'s forward (on the module inside DDP's,
    DeepSpeed's or torch.compile's wrapper, where `prepare` put them); whether there were any."""
    module: Any = model
    while module is not None:
        original = module.__dict__.pop("_original_forward", None)
        if original is not None:
            if getattr(original, "__func__", None) is type(module).forward:
                del module.forward  # the class's own forward again, as before `prepare`
            else:
                module.forward = original  # a forward set on the instance before `prepare`
            return True
        module = getattr(module, "module", None) or getattr(module, "_orig_mod", None)
    return False


class Precision:
    """The autocast regions of a micro-batch: `forward()` around the model's forward and the loss computed from
    its outputs, `loss()` around that loss alone (an autocast region of its own only where the forward has none).
    Made by `of`; as constructed bare, full precision: both regions empty."""

    def __init__(
        self,
        autocast: Callable[[], contextlib.AbstractContextManager[Any]] | None = None,
        loss_dtype: torch.dtype | None = None,
        device_type: str = "cpu",
    ):
        self.autocast, self.loss_dtype, self.device_type = autocast, loss_dtype, device_type

    @classmethod
    def of(cls, accelerator: Accelerator, mixed_precision: str) -> Precision:
        device_type = torch.device(accelerator.device).type
        if getattr(accelerator, "native_amp", False):
            return cls(accelerator.autocast, None, device_type)
        return cls(None, HALF.get(mixed_precision), device_type)

    def forward(self) -> contextlib.AbstractContextManager[Any]:
        return self.autocast() if self.autocast is not None else NOTHING

    def loss(self) -> contextlib.AbstractContextManager[Any]:
        if self.loss_dtype is None:
            return NOTHING
        return torch.autocast(self.device_type, dtype=self.loss_dtype)
