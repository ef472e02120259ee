"""Every decision that could differ between ranks goes through one collective here, so all ranks act alike."""

from __future__ import annotations

import torch
from accelerate import Accelerator


def any_rank(accelerator: Accelerator, flag: bool) -> bool:
    """True on every rank if it is true on any rank (one all-reduce of one number)."""
    if accelerator.num_processes == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(t, reduction="sum").item() > 0)
