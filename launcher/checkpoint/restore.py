"""Resuming from a checkpoint, without unpickling objects."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from launcher.checkpoint import integrity, shards, statefile
from launcher.checkpoint.damage import Damaged
from launcher.checkpoint.formats import FORMATS, checkpoint_format, reading
from launcher.errors import RunFailed
from launcher.layout import DATA_FILE, RNG_FILE, SCALER_FILE, SCHEDULER_FILE


def load(
    accelerator: Accelerator,
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    fmt: str = "full",
) -> dict[str, Any]:
    """Restore model, optimizer, scheduler, loss scaler and this rank's RNG from `path`, which this run reads in
    format `fmt`; return the trainer state.

    Nothing is unpickled: weights are safetensors, the rest `torch.load(weights_only=True)`, which refuses any
    object but tensors and plain containers (shards: see `shards.py`). A file that does not load (a checkpoint
    written before manifests, damaged since) is refused in one line naming it.
    """
    try:
        state = integrity.read_state(path)
        _check_format(path, fmt)
        FORMATS[fmt].load_model_and_optimizer(accelerator, path, model, optimizer, state)
        _load_rest(accelerator, path, scheduler)
        return state
    except shards.UnsafeCheckpoint as e:
        raise RunFailed(e.refusal(f"error: resume: {path}"), exit_code=2) from None
    except (Damaged, statefile.Unreadable) as e:
        raise RunFailed(f"error: resume: {path}: {e}", exit_code=2) from None


def _check_format(path: Path, fmt: str) -> None:
    """Refuse a checkpoint in another format than this run's strategy reads."""
    found = checkpoint_format(path)
    if found != fmt:
        written_by = FORMATS[found].written_by
        raise RunFailed(
            f"error: resume: {path} was written with strategy.name={written_by} ({found} format); this run uses "
            f"{FORMATS[fmt].written_by}: resume it with strategy.name={written_by}",
            exit_code=2,
        )


def _load_rest(accelerator: Accelerator, path: Path, scheduler: Any) -> None:
    """What every format holds alike: the scheduler, the loss scaler (fp16) and every rank's RNG."""
    with reading(SCHEDULER_FILE):
        scheduler.load_state_dict(torch.load(path / SCHEDULER_FILE, weights_only=True))
    if accelerator.scaler is not None and (path / SCALER_FILE).is_file():
        with reading(SCALER_FILE):
            accelerator.scaler.load_state_dict(torch.load(path / SCALER_FILE, weights_only=True))
    with reading(RNG_FILE):
        rng_states = torch.load(path / RNG_FILE, weights_only=True)["ranks"]
        # A rank beyond those that saved (resuming on more processes) keeps its freshly seeded RNG.
        if accelerator.process_index < len(rng_states):
            rng = rng_states[accelerator.process_index]
            torch.set_rng_state(rng["torch"])
            random.setstate(_as_tuple(rng["python"]))
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])


def data_states(path: Path) -> list[Any] | None:
    """Every rank's place in a streamed train set, as the checkpoint at `path` saved them (None: it saved none)."""
    if not (path / DATA_FILE).is_file():
        return None
    try:
        with reading(DATA_FILE):
            return list(torch.load(path / DATA_FILE, weights_only=True)["ranks"])
    except shards.UnsafeCheckpoint as e:
        raise RunFailed(e.refusal(f"error: resume: {path}"), exit_code=2) from None
    except Damaged as e:
        raise RunFailed(f"error: resume: {path}: {e}", exit_code=2) from None


def _as_tuple(value: Any) -> Any:
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value
