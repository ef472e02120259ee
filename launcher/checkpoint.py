"""Checkpoints: atomic directories, loaded without unpickling objects.

A checkpoint is a directory `step_00000400/` holding the model and optimizer state, `scheduler.pt`, `scaler.pt`
(fp16), `rng.pt` (every rank's RNG), `recipe.yaml` and, written last, `trainer_state.json`. The model and optimizer
are `model.safetensors` + `optimizer.safetensors`, written by the main process alone (DDP, one process), or each
process's shard in `dcp/` (FSDP) or `deepspeed/` (DeepSpeed ZeRO), see `shards.py`. The directory is built under a
hidden temporary name, synced to disk and renamed into place, so a crash at any moment leaves either the whole
directory or none of it. `trainer_state.json` records every other file's size and checksum (`integrity.py`): a
checkpoint damaged after it was written is refused in one line naming the file, and passed over by `resume=auto`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import random
import shutil
import threading
from collections.abc import Callable, Iterator, Sequence
from copy import deepcopy
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from launcher import integrity, shards, statefile
from launcher.errors import RunFailed
from launcher.integrity import Damaged
from launcher.layout import RECIPE_FILE, STATE_FILE, STEP_DIR, complete_steps, is_complete, read_json, step_dir_name

WEIGHTS_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
OLD_OPTIMIZER_FILE = "optimizer.pt"  # written by launcher 0.1.0 before optimizer.safetensors


def latest(ckpt_dir: Path) -> Path | None:
    steps = complete_steps(ckpt_dir)
    return ckpt_dir / step_dir_name(steps[-1]) if steps else None


def latest_intact(ckpt_dir: Path) -> tuple[Path | None, list[str]]:
    """The newest complete checkpoint that is intact, and a line (`<path>: damaged: <problem>`) for each newer one
    passed over. Every rank of a launch calls this on the same files and so picks the same checkpoint."""
    passed_over = []
    for step in reversed(complete_steps(ckpt_dir)):
        path = ckpt_dir / step_dir_name(step)
        problem = integrity.problems(path)
        if problem is None:
            return path, passed_over
        passed_over.append(f"{path}: damaged: {problem}")
    return None, passed_over


def damage(path: Path) -> str | None:
    """What is damaged in a complete checkpoint, as one line, or None (see `integrity.problems`)."""
    return integrity.problems(path)


def interrupted(path: Path) -> bool:
    """A save that did not finish: no trainer state yet, or still (or again) under a temporary name, which a crash
    just before the final rename leaves holding a trainer state."""
    return not is_complete(path) or path.name.startswith((".tmp-", ".old-"))


def retained(steps: Sequence[int], keep_last: int, best: Sequence[Sequence[float]] = ()) -> set[int]:
    """The step checkpoints retention keeps: the newest `keep_last`, and those listed in `best` ([step, metric]
    pairs, the run's `keep_best` best so far)."""
    newest = sorted(steps)[-keep_last:] if keep_last else []
    return set(newest) | {int(step) for step, _ in best if int(step) in steps}


def to_delete(steps: Sequence[int], keep_last: int, best: Sequence[Sequence[float]] = ()) -> list[int]:
    """Which of these step checkpoints retention removes."""
    keep = retained(steps, keep_last, best)
    return sorted(s for s in steps if s not in keep)


def rank_best(best: Sequence[Sequence[float]], step: int, value: float, keep_best: int, mode: str) -> list[list[float]]:
    """The `keep_best` best [step, metric] pairs once `value` at `step` is counted (ties go to the older)."""
    if math.isnan(value):
        return [list(b) for b in best]
    pairs = sorted([*([list(b) for b in best]), [step, value]], key=lambda b: (b[1] if mode == "min" else -b[1], b[0]))
    return pairs[:keep_best]


def best(ckpt_dir: Path) -> Path | None:
    """The complete checkpoint with the best recorded metric, by the mode it was recorded with."""
    scored = []
    for step in complete_steps(ckpt_dir):
        # A trainer state that does not parse has no metric: the checkpoint is refused when it is used.
        monitor = read_json(ckpt_dir / step_dir_name(step) / STATE_FILE).get("monitor") or {}
        if not isinstance(monitor, dict):
            continue
        if monitor.get("value") is not None:
            sign = 1 if monitor.get("mode", "min") == "min" else -1
            scored.append((sign * monitor["value"], step))
    return ckpt_dir / step_dir_name(min(scored)[1]) if scored else None


def resolve(path: Path) -> Path:
    """`.../checkpoints/latest` and `.../checkpoints/best` name checkpoints without links that a shared file
    system might break: they are looked up here."""
    if path.exists() or path.name not in ("latest", "best"):
        return path
    found = latest(path.parent) if path.name == "latest" else best(path.parent)
    return found if found is not None else path


def saved_step(path: Path) -> int:
    """The step a complete checkpoint was written at."""
    return int(json.loads((path / STATE_FILE).read_text())["step"])


def saved_world_size(path: Path) -> int:
    """The number of processes that wrote a complete checkpoint."""
    return int(json.loads((path / STATE_FILE).read_text()).get("world_size", 1))


def checkpoint_format(path: Path) -> str:
    """`full` (one weights file), `dcp` (FSDP shards) or `deepspeed` (ZeRO partitions)."""
    if (path / shards.DCP_DIR).is_dir():
        return "dcp"
    if (path / shards.DEEPSPEED_DIR).is_dir():
        return "deepspeed"
    return "full"


FORMAT_OF_STRATEGY = {"ddp": "full", "fsdp": "dcp", "deepspeed": "deepspeed"}


class Writer:
    """Saves checkpoints. Every rank calls `save`; each hands its RNG state to the main process. With DDP or one
    process the main process alone writes (other ranks write nothing into the directory); with a sharded strategy
    every rank first writes its shard into the temporary directory, then the main process completes it.

    With `background`, the main process copies what it saves to host memory and writes it in a thread while
    training goes on: training stalls for the copy, not for the disk. One write is in flight at a time; `wait`
    blocks until it is on disk (and raises what it failed with).
    """

    def __init__(self, accelerator: Accelerator, background: bool = False, strategy: str = "ddp"):
        self.accelerator = accelerator
        self.background = background
        self.strategy = strategy
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def save(
        self,
        path: Path,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        trainer_state: dict[str, Any],
        recipe_text: str,
        after: Callable[[], None] = lambda: None,
    ) -> None:
        """Write a checkpoint at `path` atomically, then run `after` (retention) on the main process."""
        accelerator = self.accelerator
        rng_states = _gather_rng(accelerator)
        if self.strategy != "ddp":
            self._save_sharded(path, model, optimizer, scheduler, trainer_state, recipe_text, after, rng_states)
            return
        if accelerator.is_main_process:
            self.wait()
            scaler = accelerator.scaler
            # A background write needs copies that later steps cannot change; a synchronous one writes the live
            # tensors (copied only off an accelerator), which spares a copy of the whole state.
            copy = self.background
            weights = weights_snapshot(accelerator.unwrap_model(model), copy=copy)
            optimizer_state = _host_copy(optimizer.state_dict(), copy)
            snapshot = {
                "scheduler.pt": _host_copy(scheduler.state_dict(), copy),
                "rng.pt": {"ranks": rng_states},
                **({"scaler.pt": _host_copy(scaler.state_dict(), copy)} if scaler is not None else {}),
            }
            state = {**trainer_state, "world_size": accelerator.num_processes, "format": "full"}
            job = functools.partial(_write_full, path, weights, optimizer_state, snapshot, state, recipe_text, after)
            if self.background:
                self.thread = threading.Thread(target=self._run, args=(job,), name="checkpoint-writer", daemon=True)
                self.thread.start()
            else:
                job()
        if not self.background:
            accelerator.wait_for_everyone()

    def _save_sharded(
        self,
        path: Path,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        trainer_state: dict[str, Any],
        recipe_text: str,
        after: Callable[[], None],
        rng_states: list[dict[str, Any]],
    ) -> None:
        accelerator = self.accelerator
        tmp = _fresh_tmp(path) if accelerator.is_main_process else _tmp_dir(path)
        accelerator.wait_for_everyone()
        if self.strategy == "fsdp":
            shards.save_dcp(tmp / shards.DCP_DIR, model, optimizer)
        else:
            shards.save_deepspeed(tmp, model)
        accelerator.wait_for_everyone()  # every shard is written
        if accelerator.is_main_process:
            for script in tmp.glob("zero_to_*.py"):
                script.unlink()  # DeepSpeed's own converters unpickle freely; `launcher ckpt export` replaces them
            snapshot = {"scheduler.pt": _host_copy(scheduler.state_dict()), "rng.pt": {"ranks": rng_states}}
            state = {**trainer_state, "world_size": accelerator.num_processes, "format": checkpoint_format(tmp)}
            _complete(path, snapshot, state, recipe_text, after)
        accelerator.wait_for_everyone()

    def _run(self, job: Callable[[], None]) -> None:
        try:
            job()
        except BaseException as e:  # handed to the training thread by `wait`
            self.error = e

    def wait(self) -> None:
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.error is not None:
            error, self.error = self.error, None
            raise error


def _write_full(
    path: Path,
    weights: tuple[dict[str, torch.Tensor], dict[str, str]],
    optimizer_state: dict[str, Any],
    snapshot: dict[str, Any],
    trainer_state: dict[str, Any],
    recipe_text: str,
    after: Callable[[], None],
) -> None:
    """A checkpoint of the main process alone: the weights and optimizer files, then the rest (`_complete`)."""
    tmp = _fresh_tmp(path)
    kept, aliases = weights
    save_file(kept, str(tmp / WEIGHTS_FILE), metadata={"aliases": json.dumps(aliases)})
    statefile.save(optimizer_state, tmp / OPTIMIZER_FILE)
    _complete(path, snapshot, trainer_state, recipe_text, after)


def _complete(
    path: Path,
    snapshot: dict[str, Any],
    trainer_state: dict[str, Any],
    recipe_text: str,
    after: Callable[[], None],
) -> None:
    """Complete the checkpoint in `path`'s temporary directory (the weights or shards are there already), then
    rename it into place and run `after`."""
    tmp = _tmp_dir(path)
    for name, value in snapshot.items():
        torch.save(value, tmp / name)
    (tmp / RECIPE_FILE).write_text(recipe_text)
    # Every file is in place (other ranks' shards too): their sizes and checksums go into the file that completes it.
    trainer_state = {**trainer_state, integrity.MANIFEST_KEY: integrity.manifest(tmp)}
    (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=2))
    _sync(tmp)  # on disk before the rename makes the directory count as complete
    _replace_dir(tmp, path)
    after()


def _tmp_dir(path: Path) -> Path:
    return path.parent / f".tmp-{path.name}"


def _fresh_tmp(path: Path) -> Path:
    """`path`'s temporary directory, empty."""
    tmp = _tmp_dir(path)
    if tmp.exists():
        shutil.rmtree(tmp)  # left by a crash during an earlier save of the same step
    tmp.mkdir(parents=True)
    return tmp


def _host_copy(value: Any, copy: bool = True) -> Any:
    """`value` in host memory: a copy that later training steps cannot change, or (`copy=False`) its tensors
    copied only where they are not in host memory already."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=copy)
    if isinstance(value, dict):
        return {k: _host_copy(v, copy) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_host_copy(v, copy) for v in value)
    return deepcopy(value) if copy else value


def _gather_rng(accelerator: Accelerator) -> list[dict[str, Any]]:
    rng: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return list(gather_object([rng])) if accelerator.num_processes > 1 else [rng]


def _sync(directory: Path) -> None:
    """Every file (shards other ranks wrote included) and directory under `directory` on disk."""
    for item in [*sorted(directory.rglob("*"), reverse=True), directory]:
        if item.is_file():
            with item.open("rb") as f:
                os.fsync(f.fileno())
        else:
            fd = os.open(item, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


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
    strategy: str = "ddp",
) -> dict[str, Any]:
    """Restore model, optimizer, scheduler, loss scaler and this rank's RNG from `path`; return the trainer state.

    Nothing is unpickled: weights are safetensors, the rest `torch.load(weights_only=True)`, which refuses any
    object but tensors and plain containers (shards: see `shards.py`). A file that does not load (a checkpoint
    written before manifests, damaged since) is refused in one line naming it.
    """
    try:
        return _load(accelerator, path, model, optimizer, scheduler, strategy)
    except shards.UnsafeCheckpoint as e:
        message = f"error: resume: {path} holds a file that is not plain tensors; refusing to load it ({e})"
        raise RunFailed(message.splitlines()[0], exit_code=2) from None
    except (Damaged, statefile.Unreadable) as e:
        raise RunFailed(f"error: resume: {path}: {e}", exit_code=2) from None


def _load(
    accelerator: Accelerator,
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    strategy: str,
) -> dict[str, Any]:
    state = integrity.read_state(path)
    fmt, wanted = checkpoint_format(path), FORMAT_OF_STRATEGY[strategy]
    if fmt != wanted:
        written_by = {v: k for k, v in FORMAT_OF_STRATEGY.items()}[fmt]
        raise RunFailed(
            f"error: resume: {path} was written with strategy.name={written_by} ({fmt} format); this run uses "
            f"{strategy}: resume it with strategy.name={written_by}",
            exit_code=2,
        )
    universal = path.parent / f".universal-{path.name}"
    try:
        if fmt == "full":
            with _reading(WEIGHTS_FILE):
                weights = read_weights(path / WEIGHTS_FILE)
            accelerator.unwrap_model(model).load_state_dict(weights, strict=True)
        elif fmt == "dcp":
            shards.load_dcp(path / shards.DCP_DIR, model, optimizer)
        elif state.get("world_size", 1) == accelerator.num_processes:
            shards.load_deepspeed(path, model)
        else:  # ZeRO partitions are tied to the world size: DeepSpeed's universal checkpoint is not
            if accelerator.is_main_process:
                shards.to_universal(path, universal)
            accelerator.wait_for_everyone()
            shards.load_deepspeed(universal, model)
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                shutil.rmtree(universal, ignore_errors=True)
    except RuntimeError as e:  # what is left once the files were read: the model does not fit them
        detail = " ".join(str(e).split())[:300]
        message = f"error: resume: {path} holds a model of another shape than the recipe's: {detail}"
        raise RunFailed(message, exit_code=2) from None
    if fmt == "full":
        optimizer_file = OPTIMIZER_FILE if (path / OPTIMIZER_FILE).is_file() else OLD_OPTIMIZER_FILE
        with _reading(optimizer_file):
            optimizer.load_state_dict(load_optimizer_state(path))
    with _reading("scheduler.pt"):
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    if accelerator.scaler is not None and (path / "scaler.pt").is_file():
        with _reading("scaler.pt"):
            accelerator.scaler.load_state_dict(torch.load(path / "scaler.pt", weights_only=True))
    with _reading("rng.pt"):
        rng_states = torch.load(path / "rng.pt", weights_only=True)["ranks"]
        # A rank beyond those that saved (resuming on more processes) keeps its freshly seeded RNG.
        if accelerator.process_index < len(rng_states):
            rng = rng_states[accelerator.process_index]
            torch.set_rng_state(rng["torch"])
            random.setstate(_as_tuple(rng["python"]))
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
    return state


@contextlib.contextmanager
def _reading(name: str) -> Iterator[None]:
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


def incomplete(ckpt_dir: Path) -> list[Path]:
    """Checkpoint directories a crash left unfinished: ignored on resume, worth a warning."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(
        child
        for child in ckpt_dir.iterdir()
        if child.is_dir()
        and (child.name.startswith((".tmp-", ".old-")) or (STEP_DIR.match(child.name) and not is_complete(child)))
    )


def prune(ckpt_dir: Path, keep_last: int, best: Sequence[Sequence[float]] = ()) -> None:
    """Retention, run by the main process alone, among complete checkpoints only."""
    for step in to_delete(complete_steps(ckpt_dir), keep_last, best):
        shutil.rmtree(ckpt_dir / step_dir_name(step), ignore_errors=True)


def _as_tuple(value: Any) -> Any:
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


# ---------------------------------------------------------------------------------------------------- weights


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


def read_weights(file: Path) -> dict[str, torch.Tensor]:
    """Every key of the saved state dict, aliases included (as the same tensor)."""
    with safe_open(str(file), "pt") as f:
        aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
    state = load_file(str(file))
    for alias, name in aliases.items():
        state[alias] = state[name]
    return state


def load_optimizer_state(path: Path) -> dict[str, Any]:
    """The optimizer state of a `full` checkpoint (either file format)."""
    if (path / OPTIMIZER_FILE).is_file():
        return statefile.load(path / OPTIMIZER_FILE)
    return torch.load(path / OLD_OPTIMIZER_FILE, map_location="cpu", weights_only=True)


def load_weights(model: torch.nn.Module, file: Path) -> None:
    """Load strictly: a missing, unexpected or differently shaped tensor is a RuntimeError naming it."""
    model.load_state_dict(read_weights(file), strict=True)


def export(path: Path, out: Path) -> int:
    """One plain safetensors file of the checkpoint's weights (sharded ones consolidated), every key its own
    tensor, loadable with `safetensors.torch.load_file` and `load_state_dict` and nothing else. Returns the
    number of tensors. Raises `shards.UnsafeCheckpoint` for a file that is not plain tensors, `Damaged` for one
    that does not load."""
    fmt = checkpoint_format(path)
    if fmt == "dcp":
        weights = shards.dcp_weights(path / shards.DCP_DIR)
    elif fmt == "deepspeed":
        weights = shards.deepspeed_weights(path)
    else:
        with _reading(WEIGHTS_FILE):
            weights = read_weights(path / WEIGHTS_FILE)
    state = {name: tensor.detach().to("cpu").clone().contiguous() for name, tensor in weights.items()}
    tmp = out.parent / f".tmp-{out.name}"
    save_file(state, str(tmp))
    tmp.replace(out)
    return len(state)


def summary(path: Path) -> dict[str, Any]:
    """What `launcher ckpt info` shows of one checkpoint directory; `problem` says what is damaged (every file's
    checksum is verified), None when it is intact or an interrupted save (which nothing loads)."""
    files = [f for f in path.rglob("*") if f.is_file()]
    info: dict[str, Any] = {
        "checkpoint": str(path),
        "complete": not interrupted(path),
        "size_bytes": sum(f.stat().st_size for f in files),
        "files": len(files),
        "format": checkpoint_format(path),
        "problem": None,
    }
    if not info["complete"]:
        return info
    info["problem"] = integrity.problems(path)
    if info["problem"] is not None:
        return info
    state = integrity.read_state(path)
    info.update(
        step=state.get("step"),
        epoch=state.get("epoch"),
        samples_in_epoch=state.get("samples_in_epoch"),
        world_size=state.get("world_size"),
        monitor=state.get("monitor"),
        skipped_steps=state.get("skipped_steps"),
    )
    info.update(_recipe_summary(path / RECIPE_FILE))
    return info


def _recipe_summary(recipe_file: Path) -> dict[str, Any]:
    """The strategy and model a checkpoint's recipe names; nothing where it has none (or, written before
    manifests, one that no longer parses: resuming does not read it)."""
    import yaml

    try:
        recipe = yaml.safe_load(recipe_file.read_text())
    except (OSError, ValueError, yaml.YAMLError):
        return {}
    if not isinstance(recipe, dict):
        return {}
    strategy, model = recipe.get("strategy"), recipe.get("model")
    return {
        "strategy": strategy.get("name") if isinstance(strategy, dict) else None,
        "model": model.get("_component_") if isinstance(model, dict) else None,
    }
