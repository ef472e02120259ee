"""`launcher ckpt export --format hf` of a LoRA model's checkpoint (see `models/lora.py`): the adapter as peft
saves it (`adapter_config.json`, `adapter_model.safetensors`, which `PeftModel.from_pretrained(base, DIR)` and
`AutoPeftModelForCausalLM.from_pretrained(DIR)` load), or with `--merge` the model with the adapters merged into
its weights, which `AutoModelForCausalLM.from_pretrained(DIR)` loads; the tokenizer beside either.

The adapter's `base_model_name_or_path` is the pretrained base the run loaded. A base built from a config exists
only in the checkpoint: the adapter export then writes it into `DIR/base/` and names that directory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from launcher.checkpoint.formats import FORMATS, checkpoint_format
from launcher.checkpoint.hf_export import copy_files, fresh_tmp, inference_config, load_strictly, replace
from launcher.components import optional
from launcher.layout import ADAPTER_CONFIG_FILE, HF_DIR, LORA_BASE_FILE

BASE_DIR = "base"  # in an adapter export of a base built from a config
NOT_COPIED = {"config.json", ADAPTER_CONFIG_FILE, LORA_BASE_FILE}


def is_lora(path: Path) -> bool:
    return (path / HF_DIR / ADAPTER_CONFIG_FILE).is_file()


def export_lora(path: Path, out: Path, merge: bool, max_shard_size: str = "5GB") -> int:
    """Write `out` (replacing it): the adapter, or (`merge`) the merged model; returns the tensors saved."""
    folder = path / HF_DIR
    base_info = json.loads((folder / LORA_BASE_FILE).read_text())
    model = adapted(path, folder, base_info)
    tmp = fresh_tmp(out)
    if merge:
        merged = model.merge_and_unload()
        merged.save_pretrained(tmp, max_shard_size=max_shard_size)
        count = len(merged.state_dict())
    else:
        count = save_adapter(model, tmp, out, base_info["pretrained"] is None)
    copy_files(folder, tmp, NOT_COPIED, overwrite=False)
    replace(out, tmp)
    return count


def adapted(path: Path, folder: Path, base_info: dict[str, Any]) -> Any:
    """peft's model of the checkpoint: its base (loaded from `pretrained`, or the checkpoint's own) with the
    checkpoint's adapters."""
    peft = optional("peft", "hf")
    config, model_class = inference_config(folder)
    adapter = peft.LoraConfig.from_pretrained(folder)
    weights = FORMATS[checkpoint_format(path)].weights(path)
    if base_info["pretrained"] is not None:
        base = model_class.from_pretrained(base_info["pretrained"], config=config)
        model = peft.get_peft_model(base, adapter)
    else:
        with torch.device("meta"):
            model = peft.get_peft_model(model_class(config), adapter)
    inner = model.get_base_model()
    load_strictly(inner, weights, f"{type(inner).__name__} with its adapters")
    model.eval()
    return model


def save_adapter(model: Any, tmp: Path, out: Path, with_base: bool) -> int:
    """peft's adapter files in `tmp`; `with_base`: the base model too, in `base/`, which the adapter names (as it
    will be once `tmp` is renamed `out`)."""
    config = model.peft_config["default"]
    if with_base:
        config.base_model_name_or_path = str((out / BASE_DIR).resolve())
    model.save_pretrained(tmp)
    count = len(model.get_base_model().state_dict())
    if with_base:
        base = model.unload()
        base.save_pretrained(tmp / BASE_DIR)
    return count
