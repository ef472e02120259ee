"""Checkpoints: atomic directories saved by rank 0 (plus each rank's RNG), loaded without unpickling objects.

A checkpoint is a directory `step_00000400/` holding `model.safetensors`, `optimizer.pt`, `scheduler.pt`,
`rng_rank<k>.pt` and, written last, `trainer_state.json`. It is built under a hidden temporary name and renamed
into place, so a crash at any moment leaves either the whole directory or none of it.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from safetensors.torch import load_model, save_model

STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def is_complete(path: Path) -> bool:
    return (path / STATE_FILE).is_file()


def complete_steps(ckpt_dir: Path) -> list[int]:
    """Steps of the complete checkpoints under `ckpt_dir`, oldest first; partial or foreign dirs are ignored."""
    if not ckpt_dir.is_dir():
        return []
    steps = []
    for child in ckpt_dir.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and is_complete(child):
            steps.append(int(match.group(1)))
    return sorted(steps)


def latest(ckpt_dir: Path) -> Path | None:
    steps = complete_steps(ckpt_dir)
    return ckpt_dir / step_dir_name(steps[-1]) if steps else None


def to_delete(steps: list[int], keep_last: int) -> list[int]:
    """Which of these step checkpoints retention removes: all but the newest `keep_last`."""
    return sorted(steps)[:-keep_last] if len(steps) > keep_last else []


def save(
    accelerator: Accelerator,
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    trainer_state: dict[str, Any],
) -> None:
    """Write a checkpoint at `path` atomically. Called on every rank: all take part, rank 0 writes the files."""
    tmp = path.parent / f".tmp-{path.name}"
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)  # left by a crash during an earlier save of the same step
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(rng, tmp / f"rng_rank{accelerator.process_index}.pt")
    if accelerator.is_main_process:
        save_model(accelerator.unwrap_model(model), str(tmp / "model.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    accelerator.wait_for_everyone()  # every rank's files are in before the directory is declared complete
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=2))
        _replace_dir(tmp, path)
    accelerator.wait_for_everyone()


def _replace_dir(new: Path, path: Path) -> None:
    """Put `new` at `path`; an older directory there is moved aside first and removed only afterwards."""
    old = path.parent / f".old-{path.name}"
    if old.exists():
        shutil.rmtree(old)
    if path.exists():
        path.rename(old)
    new.rename(path)
    if old.exists():
        shutil.rmtree(old)


def load(
    accelerator: Accelerator,
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
) -> dict[str, Any]:
    """Restore model, optimizer, scheduler and this rank's RNG from `path`; return the trainer state."""
    load_model(accelerator.unwrap_model(model), str(path / "model.safetensors"), device=str(accelerator.device))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rng_file = path / f"rng_rank{accelerator.process_index}.pt"
    if rng_file.is_file():  # absent when resuming on more ranks than saved; those ranks keep their seeded RNG
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["torch"])
        random.setstate(_as_tuple(rng["python"]))
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
    return json.loads((path / STATE_FILE).read_text())


def prune(accelerator: Accelerator, ckpt_dir: Path, keep_last: int) -> None:
    if accelerator.is_main_process:
        for step in to_delete(complete_steps(ckpt_dir), keep_last):
            shutil.rmtree(ckpt_dir / step_dir_name(step), ignore_errors=True)


def _as_tuple(value: Any) -> Any:
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value
