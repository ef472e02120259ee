"""The three ways a checkpoint holds the model and optimizer, one object each with one interface.

- `full`: `model.safetensors` + `optimizer.safetensors`, written by the main process alone (DDP, one process).
- `dcp`: every process's shard in `dcp/` (FSDP), see `shards.py`.
- `deepspeed`: every process's ZeRO partition in `deepspeed/` (DeepSpeed), see `shards.py`.

The rest of a checkpoint (scheduler, scaler, RNG, recipe, trainer state) is the same in every format.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from copy import deepcopy
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from launcher.checkpoint import adapters, integrity, shards, statefile
from launcher.checkpoint.damage import Damaged
from launcher.checkpoint.weights import (
    WEIGHTS_FILE,
    load_optimizer_state,
    optimizer_file,
    read_weights,
    weights_snapshot,
    write_weights,
)
from launcher.errors import RunFailed
from launcher.layout import DCP_DIR, DEEPSPEED_DIR, OPTIMIZER_FILE, universal_dir
from launcher.strategies import unwrap


@contextlib.contextmanager
def reading(name: str) -> Iterator[None]:
    """Whatever goes wrong reading (or applying) checkpoint file `name` becomes one line naming it: Damaged, or
    UnsafeCheckpoint where torch refused to unpickle an object."""
    try:
        yield
    except (shards.UnsafeCheckpoint, Damaged, statefile.Unreadable):
        raise
    except Exception as e:
        if shards.is_refusal(e):
            raise shards.UnsafeCheckpoint(f"{name}: {integrity.reason(e)}") from None
        raise Damaged(name, integrity.reason(e)) from None


@contextlib.contextmanager
def fitting(path: Path) -> Iterator[None]:
    """A RuntimeError while the model (and its optimizer) is loaded from `path`, once its files were read, means
    the model does not fit them: one line saying so."""
    try:
        yield
    except RuntimeError as e:
        detail = " ".join(str(e).split())[:300]
        message = f"error: resume: {path} holds a model of another shape than the recipe's: {detail}"
        if ".attn.q.weight" in detail:  # the built-in GPT's attention before q, k and v were projections of their own
            message += (
                " (the built-in GPT with one qkv projection, as earlier versions wrote it: finish the run with that "
                "version; `launcher ckpt export` still reads it; see docs/parallelism.md#upgrading)"
            )
        raise RunFailed(message, exit_code=2) from None


class Format:
    """One on-disk format of the model and optimizer state.

    `name` is what `trainer_state.json` and `launcher ckpt info` call it; `written_by` the strategy that writes it
    (for messages). A `sharded` format is written by every rank (`write_shards`) into `shard_dir`; the other is
    copied by the main process (`snapshot`, possibly while training goes on) and written from the copy
    (`write_snapshot`).
    """

    name: str = ""
    written_by: str = ""
    sharded: bool = False
    shard_dir: str | None = None

    def holds(self, path: Path) -> bool:
        """Whether the checkpoint at `path` is in this format (its shard folder is there)."""
        return self.shard_dir is not None and (path / self.shard_dir).is_dir()

    def write_shards(self, tmp: Path, model: torch.nn.Module, optimizer: Any) -> None:
        """Every rank writes its shard into the temporary checkpoint directory `tmp` (a collective)."""
        raise NotImplementedError(f"the {self.name} format is written by the main process alone")

    def tidy(self, tmp: Path) -> None:
        """On the main process once every shard is written: remove what the writer left that no one should use."""

    def snapshot(self, accelerator: Accelerator, model: torch.nn.Module, optimizer: Any, copy: bool) -> Any:
        """The main process's copy of model and optimizer state in host memory (`copy=False`: the live tensors
        where they are in host memory already)."""
        raise NotImplementedError(f"the {self.name} format is written by every process")

    def write_snapshot(self, tmp: Path, snapshot: Any) -> None:
        """Write what `snapshot` returned into the temporary checkpoint directory `tmp`."""
        raise NotImplementedError(f"the {self.name} format is written by every process")

    def load_model_and_optimizer(
        self, accelerator: Accelerator, path: Path, model: torch.nn.Module, optimizer: Any, state: dict[str, Any]
    ) -> None:
        """Restore model and optimizer from the checkpoint at `path` (whose trainer state is `state`)."""
        raise NotImplementedError

    def weights(self, path: Path) -> dict[str, torch.Tensor]:
        """The whole model's weights, read in this one process (sharded ones consolidated)."""
        raise NotImplementedError


class Full(Format):
    name, written_by, sharded = "full", "ddp", False

    def snapshot(self, accelerator: Accelerator, model: torch.nn.Module, optimizer: Any, copy: bool) -> Any:
        kept, aliases = weights_snapshot(unwrap(accelerator, model), copy=copy)
        kept = adapters.kept(model, kept)
        aliases = {alias: name for alias, name in aliases.items() if name in kept}  # a tied frozen embedding's head
        return (kept, aliases), host_copy(optimizer.state_dict(), copy)

    def write_snapshot(self, tmp: Path, snapshot: Any) -> None:
        weights, optimizer_state = snapshot
        write_weights(tmp / WEIGHTS_FILE, weights)
        statefile.save(optimizer_state, tmp / OPTIMIZER_FILE)

    def load_model_and_optimizer(
        self, accelerator: Accelerator, path: Path, model: torch.nn.Module, optimizer: Any, state: dict[str, Any]
    ) -> None:
        with fitting(path):
            weights = self.weights(path)
            strict = not adapters.adapter_only(model)
            missing, unexpected = unwrap(accelerator, model).load_state_dict(weights, strict=strict)
            adapters.check_loaded(model, missing, unexpected)
        with reading(optimizer_file(path)):
            optimizer.load_state_dict(load_optimizer_state(path))

    def weights(self, path: Path) -> dict[str, torch.Tensor]:
        with reading(WEIGHTS_FILE):
            return read_weights(path / WEIGHTS_FILE)


class Dcp(Format):
    """FSDP's shards, resharded on load: a checkpoint written by N processes resumes on M."""

    name, written_by, sharded, shard_dir = "dcp", "fsdp", True, DCP_DIR

    def write_shards(self, tmp: Path, model: torch.nn.Module, optimizer: Any) -> None:
        shards.save_dcp(tmp / DCP_DIR, model, optimizer, adapters.adapter_only(model))

    def load_model_and_optimizer(
        self, accelerator: Accelerator, path: Path, model: torch.nn.Module, optimizer: Any, state: dict[str, Any]
    ) -> None:
        with fitting(path):
            shards.load_dcp(path / DCP_DIR, model, optimizer, adapters.adapter_only(model))

    def weights(self, path: Path) -> dict[str, torch.Tensor]:
        return shards.dcp_weights(path / DCP_DIR)


class DeepSpeed(Format):
    """DeepSpeed's ZeRO partitions (the model is DeepSpeed's engine, which holds the optimizer)."""

    name, written_by, sharded, shard_dir = "deepspeed", "deepspeed", True, DEEPSPEED_DIR

    def write_shards(self, tmp: Path, model: torch.nn.Module, optimizer: Any) -> None:
        shards.save_deepspeed(tmp, model, adapters.adapter_only(model))

    def tidy(self, tmp: Path) -> None:
        for script in tmp.glob("zero_to_*.py"):
            script.unlink()  # DeepSpeed's own converters unpickle freely; `launcher ckpt export` replaces them

    def load_model_and_optimizer(
        self, accelerator: Accelerator, path: Path, model: torch.nn.Module, optimizer: Any, state: dict[str, Any]
    ) -> None:
        with fitting(path):
            if state.get("world_size", 1) == accelerator.num_processes:
                shards.load_deepspeed(path, model, adapters.adapter_only(model))
                return
            # ZeRO partitions are tied to the world size: DeepSpeed's universal checkpoint is not.
            universal = universal_dir(path)
            if accelerator.is_main_process:
                shards.to_universal(path, universal)
            accelerator.wait_for_everyone()
            shards.load_deepspeed(universal, model, adapters.adapter_only(model))
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                shutil.rmtree(universal, ignore_errors=True)

    def weights(self, path: Path) -> dict[str, torch.Tensor]:
        return shards.deepspeed_weights(path)


FULL = Full()
FORMATS: dict[str, Format] = {f.name: f for f in (FULL, Dcp(), DeepSpeed())}


def checkpoint_format(path: Path) -> str:
    """`full` (one weights file), `dcp` (FSDP shards) or `deepspeed` (ZeRO partitions)."""
    return next((f.name for f in FORMATS.values() if f.holds(path)), FULL.name)


format_of = checkpoint_format


def host_copy(value: Any, copy: bool = True) -> Any:
    """`value` in host memory: a copy that later training steps cannot change, or (`copy=False`) its tensors
    copied only where they are not in host memory already."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=copy)
    if isinstance(value, dict):
        return {k: host_copy(v, copy) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(host_copy(v, copy) for v in value)
    return deepcopy(value) if copy else value
