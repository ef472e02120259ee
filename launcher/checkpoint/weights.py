"""The `full` format's files: the model's weights in one safetensors file (tensors that share memory stored once,
their other names kept as aliases) and the optimizer state in another (`statefile.py`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from launcher.checkpoint import statefile
from launcher.layout import OLD_OPTIMIZER_FILE, OPTIMIZER_FILE, WEIGHTS_FILE

__all__ = [
    "OLD_OPTIMIZER_FILE",
    "OPTIMIZER_FILE",
    "WEIGHTS_FILE",
    "load_optimizer_state",
    "load_weights",
    "optimizer_file",
    "read_weights",
    "weights_snapshot",
    "write_weights",
]


def weights_snapshot(model: torch.nn.Module, copy: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The model's state dict in host memory (copied, or with `copy=False` only where it is elsewhere), tensors
    that share memory (tied embeddings) kept once, and the other names of each as aliases."""
    kept: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    first_name: dict[tuple, str] = {}
    for name, tensor in model.state_dict().items():
        where = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.dtype)
        if where in first_name:
            aliases[name] = first_name[where]
        else:
            first_name[where] = name
            kept[name] = tensor.detach().to("cpu", copy=copy).contiguous()
    return kept, aliases


def write_weights(file: Path, weights: tuple[dict[str, torch.Tensor], dict[str, str]]) -> None:
    """A `weights_snapshot` into one safetensors file, the aliases in its metadata."""
    kept, aliases = weights
    save_file(kept, str(file), metadata={"aliases": json.dumps(aliases)})


def read_weights(file: Path) -> dict[str, torch.Tensor]:
    """Every key of the saved state dict, aliases included (as the same tensor)."""
    with safe_open(str(file), "pt") as f:
        aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
    state = load_file(str(file))
    for alias, name in aliases.items():
        state[alias] = state[name]
    return state


def load_weights(model: torch.nn.Module, file: Path) -> None:
    """Load strictly: a missing, unexpected or differently shaped tensor is a RuntimeError naming it."""
    model.load_state_dict(read_weights(file), strict=True)


def optimizer_file(path: Path) -> str:
    """The name of the optimizer state's file in a `full` checkpoint: the safetensors one, or launcher 0.1.0's."""
    return OPTIMIZER_FILE if (path / OPTIMIZER_FILE).is_file() else OLD_OPTIMIZER_FILE


def load_optimizer_state(path: Path) -> dict[str, Any]:
    """The optimizer state of a `full` checkpoint (either file format)."""
    if (path / OPTIMIZER_FILE).is_file():
        return statefile.load(path / OPTIMIZER_FILE)
    return torch.load(path / OLD_OPTIMIZER_FILE, map_location="cpu", weights_only=True)
