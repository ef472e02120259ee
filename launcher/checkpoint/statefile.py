"""Nested state (an optimizer's state dict) in one safetensors file: the tensors as tensors, the structure as
JSON in the file's metadata.

Faster to write and read than `torch.save` (no pickling of hundreds of tensors), and loading runs no code at all.
The structure keeps what JSON alone would lose: tuples, and dict keys that are not strings (an optimizer's state
is keyed by parameter index). Tensors that share memory are stored once each, as safetensors requires.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

STRUCTURE_KEY = "structure"


class Unreadable(ValueError):
    """The file is not a state file (damaged, or written by something else)."""


def encode(value: Any, tensors: dict[str, torch.Tensor], path: str = "") -> Any:
    """`value` as JSON-able data; its tensors moved into `tensors` under their path (`state/0/exp_avg`)."""
    if isinstance(value, torch.Tensor):
        key = path or "/"
        tensors[key] = value.detach().contiguous()
        return {"tensor": key}
    if isinstance(value, dict):
        items = []
        for k, v in value.items():
            if not isinstance(k, (str, int, float, bool)) and k is not None:
                raise TypeError(f"{path or '/'}: a key of type {type(k).__name__} cannot be stored")
            items.append([k, encode(v, tensors, f"{path}/{k}" if path else str(k))])
        return {"dict": items}
    if isinstance(value, (list, tuple)):
        kind = "tuple" if isinstance(value, tuple) else "list"
        return {kind: [encode(v, tensors, f"{path}/{i}" if path else str(i)) for i, v in enumerate(value)]}
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise TypeError(f"{path or '/'}: a value of type {type(value).__name__} cannot be stored")


def decode(data: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if not isinstance(data, dict):
        return data
    ((kind, body),) = data.items()
    if kind == "tensor":
        return tensors[body]
    if kind == "dict":
        return {k: decode(v, tensors) for k, v in body}
    items = [decode(v, tensors) for v in body]
    return tuple(items) if kind == "tuple" else items


def save(value: Any, file: Path) -> None:
    tensors: dict[str, torch.Tensor] = {}
    structure = encode(value, tensors)
    seen: set[int] = set()
    for key, tensor in tensors.items():  # safetensors refuses tensors sharing memory: copy the second and later
        storage = tensor.untyped_storage().data_ptr()
        if storage in seen and tensor.numel():
            tensors[key] = tensor.clone()
        seen.add(storage)
    save_file(tensors, str(file), metadata={STRUCTURE_KEY: json.dumps(structure)})


def load(file: Path) -> Any:
    """The state saved in `file`, every tensor in memory of its own (not mapped from the file, which can then be
    deleted and its space freed)."""
    try:
        with safe_open(str(file), "pt") as f:
            structure = json.loads((f.metadata() or {})[STRUCTURE_KEY])
            tensors = {key: f.get_tensor(key).clone() for key in f.keys()}  # noqa: SIM118 (safe_open is no dict)
        return decode(structure, tensors)
    except (OSError, KeyError, ValueError, TypeError, SafetensorError) as e:
        raise Unreadable(f"{file.name} is not a state file the launcher wrote ({type(e).__name__}: {e})") from None
