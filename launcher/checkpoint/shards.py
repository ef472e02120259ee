"""Sharded checkpoint formats: every process writes its own shard, and loading never unpickles arbitrary objects.

- FSDP: `torch.distributed.checkpoint` (DCP) in `dcp/`. DCP reshards on load, so a checkpoint written by N
  processes resumes on M. DCP's own reader unpickles its metadata and non-tensor values with plain `pickle`; the
  reader and planner here accept only DCP's metadata classes and `torch.load(weights_only=True)` values.
- DeepSpeed: the engine's own ZeRO checkpoint in `deepspeed/`, read through a checkpoint engine that loads with
  `weights_only=True` and allows DeepSpeed's plain record classes (the ZeRO stage enum, the loss scaler, the
  address of a parameter's slice in a partition).

A shard that does not load (cut short, emptied, overwritten) is `integrity.Damaged`, naming the file; one that holds
an object the loaders refuse to unpickle is `UnsafeCheckpoint`.
"""

from __future__ import annotations

import contextlib
import io
import pickle
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.planner import ReadItem

from launcher.checkpoint.damage import Damaged, reason
from launcher.layout import DEEPSPEED_DIR


class UnsafeCheckpoint(Exception):
    """A checkpoint file holds something other than tensors and plain values."""

    def refusal(self, where: str) -> str:
        """The one line that refuses the checkpoint `where` names."""
        return f"{where} holds a file that is not plain tensors; refusing to load it ({self})".splitlines()[0]


def is_refusal(e: BaseException) -> bool:
    """Whether `e` is an unpickler refusing what a file holds (UnsafeCheckpoint), not a file failing to load
    (Damaged): `_MetadataUnpickler` refusing a class, or torch's weights-only unpickler refusing anything (a global,
    or an opcode: a crafted pickle and bytes that are no pickle at all look alike to it, and both are refused)."""
    text = str(e).lower()
    return "unsupported global" in text or "refusing to unpickle" in text or "weights only load failed" in text


def _inner(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer under Accelerate's wrapper."""
    return getattr(optimizer, "optimizer", optimizer)


# ---------------------------------------------------------------------------------------------------- DCP


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's `.metadata` file: its record classes, torch sizes and dtypes, paths, nothing else."""

    _ALLOWED = {
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch.serialization", "_get_layout"),
        ("torch", "Size"),
        ("collections", "OrderedDict"),
        ("pathlib", "PosixPath"),
        ("pathlib", "PurePosixPath"),
        ("pathlib", "WindowsPath"),
        ("pathlib", "PureWindowsPath"),
        ("builtins", "set"),
        ("builtins", "frozenset"),
    }

    def find_class(self, module: str, name: str) -> Any:
        plain_torch = module == "torch" and isinstance(
            getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format)
        )
        if module == "torch.distributed.checkpoint.metadata" or (module, name) in self._ALLOWED or plain_torch:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")


class SafeReader(FileSystemReader):
    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        from torch.distributed.checkpoint.metadata import StorageMeta

        # From bytes in memory, not the file: a length that damage made up is then "truncated", not an allocation.
        metadata = _MetadataUnpickler(io.BytesIO((Path(self.path) / ".metadata").read_bytes())).load()
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """Non-tensor values (optimizer hyperparameters, step counts) loaded with `weights_only=True`."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        from torch.distributed.checkpoint._nested_dict import set_element

        loaded = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


def _alone() -> bool:
    """No process group (one process): DCP reads and writes without collectives."""
    return not torch.distributed.is_initialized()


@contextlib.contextmanager
def _quiet_alone() -> Iterator[None]:
    """DCP warns that it works in one process even when told so."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        yield


def _dcp_options(trainable_only: bool) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=trainable_only, strict=not trainable_only)


def _dcp_state(model: torch.nn.Module, optimizer: Any, trainable_only: bool = False) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, _inner(optimizer), options=_dcp_options(trainable_only))
    if trainable_only:  # torch leaves a frozen tensor's other names in (a tied head's)
        names = {name for name, p in model.named_parameters() if p.requires_grad}
        model_state = {k: v for k, v in model_state.items() if k in names}
    return {"model": model_state, "optimizer": optimizer_state}


def save_dcp(directory: Path, model: torch.nn.Module, optimizer: Any, trainable_only: bool = False) -> None:
    """Every process writes its shard of model and optimizer state (a collective: all ranks call it);
    `trainable_only`: of the model, only its trainable parameters (a LoRA model's adapters)."""
    import torch.distributed.checkpoint as dcp

    state = _dcp_state(model, optimizer, trainable_only)
    with _quiet_alone():
        dcp.save(state, storage_writer=FileSystemWriter(str(directory)), no_dist=_alone())


def load_dcp(directory: Path, model: torch.nn.Module, optimizer: Any, trainable_only: bool = False) -> None:
    """Load into this run's sharding, whatever the world size that wrote it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    state = _dcp_state(model, optimizer, trainable_only)
    check_dcp(directory)  # refused here, the same on every rank, before any collective
    with _dcp_errors(directory), _quiet_alone():
        dcp.load(state, storage_reader=SafeReader(str(directory)), planner=SafeLoadPlanner(), no_dist=_alone())
    set_state_dict(
        model,
        _inner(optimizer),
        model_state_dict=state["model"],
        optim_state_dict=state["optimizer"],
        options=_dcp_options(trainable_only),
    )


def dcp_weights(directory: Path) -> dict[str, torch.Tensor]:
    """The whole model's weights from a DCP checkpoint, read in this one process (no process group)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = check_dcp(directory)
    weights = {
        key.removeprefix("model."): torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
        for key, meta in metadata.state_dict_metadata.items()
        if key.startswith("model.") and isinstance(meta, TensorStorageMetadata)
    }
    state = {"model": weights}
    with _dcp_errors(directory), _quiet_alone():
        dcp.load(state, storage_reader=SafeReader(str(directory)), planner=SafeLoadPlanner(), no_dist=True)
    return state["model"]


def check_dcp(directory: Path) -> Any:
    """The checkpoint's metadata, once it unpickles safely and every shard file holds the bytes it points into;
    UnsafeCheckpoint or Damaged otherwise. DCP reads tensors as raw bytes: a shard cut short would fail deep in
    its reader, and only a manifest tells a shard overwritten with other bytes."""
    name = f"{directory.name}/.metadata"
    try:
        metadata = SafeReader(str(directory)).read_metadata()
    except pickle.UnpicklingError as e:
        if is_refusal(e):
            raise UnsafeCheckpoint(f"{directory}/.metadata: {e}") from None
        raise Damaged(name, reason(e)) from None
    except Exception as e:  # cut short (EOFError), emptied, overwritten (anything the unpickler makes of it)
        raise Damaged(name, reason(e)) from None
    needed: dict[str, int] = {}
    for info in (getattr(metadata, "storage_data", None) or {}).values():
        end = info.offset + info.length
        needed[str(info.relative_path)] = max(needed.get(str(info.relative_path), 0), end)
    for relative, end in sorted(needed.items()):
        file = directory / relative
        if not file.is_file():
            raise Damaged(f"{directory.name}/{relative}", "missing")
        if file.stat().st_size < end:
            raise Damaged(f"{directory.name}/{relative}", f"size {file.stat().st_size} bytes, its data ends at {end}")
    return metadata


@contextlib.contextmanager
def _dcp_errors(directory: Path) -> Iterator[None]:
    """DCP's failures sorted: a refused value (UnsafeCheckpoint), a value or file cut short (Damaged), anything
    else a model that does not fit the checkpoint (RuntimeError)."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        yield
    except (Exception, CheckpointException) as e:  # DCP wraps each rank's failure in a CheckpointException
        failures = list(e.failures.values()) if isinstance(e, CheckpointException) else []
        cause = failures[0][0] if failures else e  # its text is every rank's traceback; the first cause tells
        if is_refusal(cause):
            raise UnsafeCheckpoint(_short(cause)) from None
        if isinstance(cause, (pickle.UnpicklingError, EOFError, OSError)):  # a value's bytes, or a file, cut short
            raise Damaged(f"{directory.name}/", f"a shard does not load ({reason(cause)})") from None
        raise RuntimeError(_short(cause)) from None


def _short(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:300]


# ---------------------------------------------------------------------------------------------------- DeepSpeed


def _deepspeed_globals() -> list[Any]:
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def safe_torch_load(path: str | Path, map_location: Any = None) -> Any:
    """`torch.load(weights_only=True)`, with DeepSpeed's plain record classes allowed; anything else refused
    (UnsafeCheckpoint). A file that does not load is Damaged, named by its folder and name."""
    try:
        with torch.serialization.safe_globals(_deepspeed_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        if is_refusal(e):
            lines = str(e).splitlines()
            refused = next((line.strip() for line in lines if "Unsupported global" in line), reason(e))
            raise UnsafeCheckpoint(f"{path}: {refused}") from None
        raise Damaged(f"{Path(path).parent.name}/{Path(path).name}", reason(e)) from None


class _SafeCheckpointEngine:
    """DeepSpeed's checkpoint engine with its `load` replaced by `safe_torch_load`."""

    def __init__(self, engine: Any):
        self._engine = engine

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def load(self, path: str, map_location: Any = None) -> Any:
        return safe_torch_load(path, map_location)


def save_deepspeed(checkpoint_dir: Path, engine: Any, trainable_only: bool = False) -> None:
    """Every process writes its ZeRO partition (a collective: all ranks call it); `trainable_only`: without the
    frozen parameters (a LoRA model's base)."""
    engine.save_checkpoint(
        str(checkpoint_dir), tag=DEEPSPEED_DIR, save_latest=False, exclude_frozen_parameters=trainable_only
    )


def load_deepspeed(checkpoint_dir: Path, engine: Any, trainable_only: bool = False) -> None:
    if not isinstance(engine.checkpoint_engine, _SafeCheckpointEngine):
        engine.checkpoint_engine = _SafeCheckpointEngine(engine.checkpoint_engine)
    try:
        path, _ = engine.load_checkpoint(
            str(checkpoint_dir),
            tag=DEEPSPEED_DIR,
            load_optimizer_states=True,
            load_lr_scheduler_states=False,
            load_module_strict=not trainable_only,
        )
    except (UnsafeCheckpoint, Damaged):
        raise
    except Exception as e:
        raise RuntimeError(_short(e)) from None
    if path is None:  # DeepSpeed says so only in a log line: its model states file is not there
        raise Damaged(f"{DEEPSPEED_DIR}/", "DeepSpeed found no checkpoint there (a model states file is missing)")


def _check_plain(directory: Path) -> None:
    """Every `.pt` file under `directory` loads with `weights_only=True` (else UnsafeCheckpoint)."""
    for file in sorted(directory.rglob("*.pt")):
        safe_torch_load(file, map_location="cpu")


def to_universal(checkpoint_dir: Path, out_dir: Path) -> None:
    """DeepSpeed's universal checkpoint of a ZeRO checkpoint (one file per parameter and state, independent of the
    world size) in `out_dir/deepspeed/`, which DeepSpeed loads onto any number of processes. Every input file is
    checked to load with `weights_only=True` first, and every output file after (DeepSpeed's converter and loader
    unpickle freely)."""
    from argparse import Namespace

    from deepspeed.checkpoint.ds_to_universal import main as convert

    _check_plain(checkpoint_dir / DEEPSPEED_DIR)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    args = Namespace(
        input_folder=str(checkpoint_dir / DEEPSPEED_DIR),
        output_folder=str(out_dir / DEEPSPEED_DIR),
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,
    )
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # its progress
        convert(args)
    _check_plain(out_dir)


def deepspeed_weights(checkpoint_dir: Path) -> dict[str, torch.Tensor]:
    """The whole model's fp32 weights, consolidated from the ZeRO partitions by DeepSpeed's own reader, after
    every file was checked to load with `weights_only=True` (that reader unpickles freely)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    _check_plain(checkpoint_dir / DEEPSPEED_DIR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # its progress
            return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=DEEPSPEED_DIR)
    except Exception as e:  # every file loads (checked above), yet they do not make one model: one is missing
        raise Damaged(f"{DEEPSPEED_DIR}/", reason(e)) from None
