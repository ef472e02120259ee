"""Checkpoints of a LoRA model on a pretrained base (see `models/lora.py`): only its trainable parameters (the
adapters, and `modules_to_save`) are written, in every format; on resume the frozen base is the one the run loaded
again, and a base whose files changed since is said in one warning line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from launcher.layout import HF_DIR, LORA_BASE_FILE
from launcher.models import lora


def module_of(model: Any) -> torch.nn.Module:
    """The model under a DDP wrapper or DeepSpeed's engine (FSDP2 shards the model in place)."""
    return getattr(model, "module", model)


def adapter_only(model: Any) -> bool:
    """Whether a checkpoint of `model` holds only its trainable parameters."""
    return lora.adapter_only(module_of(model))


def trainable(model: torch.nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def kept(model: torch.nn.Module, state: dict[str, Any]) -> dict[str, Any]:
    """The part of the model's state dict its checkpoint holds: all of it, or an adapter-only model's trainable
    parameters."""
    if not adapter_only(model):
        return state
    names = trainable(module_of(model))
    return {k: v for k, v in state.items() if k in names}


def check_loaded(model: torch.nn.Module, missing: list[str], unexpected: list[str]) -> None:
    """After a non-strict load of an adapter-only checkpoint: nothing unexpected, nothing trainable missing (a
    RuntimeError otherwise, which the loader reports as a model of another shape)."""
    lacking = sorted(set(missing) & trainable(module_of(model)))
    if unexpected or lacking:
        raise RuntimeError(f"missing trainable {lacking[:3]}, unexpected {list(unexpected)[:3]}")


def base_change(path: Path, model: torch.nn.Module) -> str | None:
    """A warning line when the checkpoint at `path` was trained on another base than the one this run loaded."""
    file = path / HF_DIR / LORA_BASE_FILE
    if not file.is_file():
        return None
    return lora.base_change(json.loads(file.read_text()), module_of(model))
