"""What `launcher ckpt info` shows of a checkpoint, and `launcher ckpt export`'s plain weights file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from launcher.checkpoint import integrity
from launcher.checkpoint.formats import FORMATS, checkpoint_format
from launcher.checkpoint.hf_export import NotHuggingFace, export_hf
from launcher.checkpoint.lora_export import export_lora, is_lora
from launcher.checkpoint.retention import interrupted
from launcher.layout import RECIPE_FILE, TMP_PREFIX


def export(path: Path, out: Path, fmt: str = "safetensors", max_shard_size: str = "5GB", merge: bool = False) -> int:
    """One plain safetensors file of the checkpoint's weights (sharded ones consolidated), every key its own
    tensor, loadable with `safetensors.torch.load_file` and `load_state_dict` and nothing else; with `fmt` "hf",
    the Hugging Face model directory (`hf_export`). Returns the number of tensors. Raises
    `shards.UnsafeCheckpoint` for a file that is not plain tensors, `Damaged` for one that does not load,
    `NotHuggingFace` for an hf export of another model. A LoRA model's hf export is its adapter, or with `merge`
    the model with the adapter merged in (`lora_export`)."""
    if merge and not (fmt == "hf" and is_lora(path)):
        raise NotHuggingFace("--merge merges LoRA adapters: it needs --format hf and a checkpoint of a LoRA model")
    if fmt == "hf":
        return export_lora(path, out, merge, max_shard_size) if is_lora(path) else export_hf(path, out, max_shard_size)
    weights = FORMATS[checkpoint_format(path)].weights(path)
    state = {name: tensor.detach().to("cpu").clone().contiguous() for name, tensor in weights.items()}
    tmp = out.parent / f"{TMP_PREFIX}{out.name}"
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
    try:
        return recipe_names(recipe_file.read_text())
    except OSError:
        return {}


def recipe_names(text: str | bytes) -> dict[str, Any]:
    """The strategy and model a checkpoint's recipe names; nothing where it has none (or, written before
    manifests, one that no longer parses: resuming does not read it)."""
    import yaml

    try:
        recipe = yaml.safe_load(text)
    except (ValueError, yaml.YAMLError):
        return {}
    if not isinstance(recipe, dict):
        return {}
    strategy, model = recipe.get("strategy"), recipe.get("model")
    return {
        "strategy": strategy.get("name") if isinstance(strategy, dict) else None,
        "model": model.get("_component_") if isinstance(model, dict) else None,
    }


def describe(info: dict[str, Any]) -> str:
    """One checkpoint's `summary` as `launcher ckpt info` shows it, in one line."""
    if not info["complete"]:
        return f"{info['checkpoint']}: incomplete (an interrupted save; resume ignores it), {_size(info)}"
    if info["problem"]:
        return f"{info['checkpoint']}: damaged: {info['problem']}"
    monitor = info.get("monitor") or {}
    metric = (
        f"{monitor['name']} {monitor['value']:.6g} ({monitor['mode']})" if monitor.get("value") is not None else "-"
    )
    return (
        f"{info['checkpoint']}: step {info['step']}, epoch {info['epoch']} (+{info['samples_in_epoch']} samples), "
        f"metric {metric}, world size {info['world_size']}, strategy {info.get('strategy') or '?'}, "
        f"model {info.get('model') or '?'}, {_size(info)}, complete"
    )


def _size(info: dict[str, Any]) -> str:
    size, units = float(info["size_bytes"]), ["B", "KiB", "MiB", "GiB", "TiB"]
    while size >= 1024 and len(units) > 1:
        size /= 1024
        units.pop(0)
    return f"{size:.1f} {units[0]} in {info['files']} files"
