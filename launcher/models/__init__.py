"""Built-in models: `mlp` and `gpt`. Any importable `torch.nn.Module` can be named instead."""

from __future__ import annotations

from typing import Any


def trainable_problem(model: Any, target: str) -> str | None:
    """`model: ...` when what the recipe's model built is not a module with parameters to train."""
    import torch

    if not isinstance(model, torch.nn.Module):
        return f"model: {target} gave a {type(model).__name__}, not a torch.nn.Module"
    if not any(p.requires_grad for p in model.parameters()):
        return f"model: {target} has no trainable parameters, so there is nothing to train"
    return None
