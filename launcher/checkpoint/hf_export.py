"""`launcher ckpt export --format hf`: a checkpoint of a Hugging Face model as the directory `from_pretrained`
loads: its config, safetensors shards with their index, generation config and tokenizer (kept in the checkpoint's
`hf/` folder when it was written), from any checkpoint format."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from launcher.checkpoint.formats import FORMATS, checkpoint_format
from launcher.components import optional
from launcher.layout import HF_DIR, TMP_PREFIX

CONFIG_FILE = "config.json"
WRITTEN_BY_SAVE = {CONFIG_FILE}  # save_pretrained writes the config itself; the rest are copied as they were


class NotHuggingFace(Exception):
    pass


def export_hf(path: Path, out: Path, max_shard_size: str = "5GB") -> int:
    """Write `out` (replacing it); returns the number of tensors saved. The weights are loaded into the model the
    config describes, strictly: a key missing (but a tied one), unexpected or of another shape is an error."""
    folder = path / HF_DIR
    if not (folder / CONFIG_FILE).is_file():
        raise NotHuggingFace(
            f"holds no Hugging Face model (no {HF_DIR}/{CONFIG_FILE}); export its weights with --format safetensors"
        )
    config, model_class = inference_config(folder)
    weights = FORMATS[checkpoint_format(path)].weights(path)
    with torch.device("meta"):
        model = model_class(config)
    load_strictly(model, weights, type(model).__name__)
    tmp = fresh_tmp(out)
    model.save_pretrained(tmp, max_shard_size=max_shard_size)
    copy_files(folder, tmp, WRITTEN_BY_SAVE, overwrite=True)
    replace(out, tmp)
    return len(model.state_dict())


def inference_config(folder: Path) -> tuple[Any, Any]:
    """The checkpoint's model config, set for inference, and the `transformers` class it names."""
    transformers = optional("transformers", "hf")
    config = transformers.AutoConfig.from_pretrained(folder)
    # Training runs without the key-value cache; the export is for inference, where `generate()` needs it.
    config.use_cache = True
    architecture = (config.architectures or [None])[0]
    model_class = getattr(transformers, architecture or "", None)
    if model_class is None:
        raise NotHuggingFace(f"its config names no architecture transformers has ({architecture!r})")
    return config, model_class


def load_strictly(model: torch.nn.Module, weights: dict[str, torch.Tensor], what: str) -> None:
    """Load `weights` into `model` (built on the meta device), its tied weights tied again; a tensor left on the
    meta device or one the model does not have is an error."""
    missing, unexpected = model.load_state_dict(weights, strict=False, assign=True)
    model.tie_weights()
    still_missing = [name for name in missing if _tensor(model, name).is_meta]
    if still_missing or unexpected:
        raise NotHuggingFace(
            f"its weights do not fit {what}: missing {still_missing[:3]}, unexpected {list(unexpected)[:3]}"
        )


def fresh_tmp(out: Path) -> Path:
    """The folder the export is written into before it replaces `out`, emptied."""
    tmp = out.parent / f"{TMP_PREFIX}{out.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    return tmp


def copy_files(folder: Path, tmp: Path, skipped: set[str], overwrite: bool) -> None:
    """The checkpoint's other Hugging Face files (generation config, tokenizer), as they were, beside the export's
    own; one the export wrote already is replaced with the checkpoint's (`overwrite`) or kept."""
    for file in folder.iterdir():
        if file.name not in skipped and (overwrite or not (tmp / file.name).exists()):
            shutil.copyfile(file, tmp / file.name)


def replace(out: Path, tmp: Path) -> None:
    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    tmp.replace(out)


def _tensor(model: torch.nn.Module, name: str) -> torch.Tensor:
    owner, _, leaf = name.rpartition(".")
    return getattr(model.get_submodule(owner) if owner else model, leaf)
