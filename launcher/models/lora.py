"""LoRA adapters on a Hugging Face model (`model.lora` of `hf_causal_lm` and `hf_classifier`), applied with
`peft`: low-rank matrices beside the chosen linear layers train, the base model stays frozen.

The model the launcher trains stays the `transformers` model (peft's layers injected into it, its `PeftModel`
wrapper dropped): its forward, output head, decoder blocks and state-dict names are what the rest of the launcher
knows. Its frozen base is in no optimizer group (see `param_groups.make_groups`).

What a checkpoint holds (see `adapter_only`): with a `pretrained` base, which can be loaded again, only the
trainable parameters (and their optimizer state); the base's directory and its files' sizes and modification times
are recorded (`LORA_BASE_FILE`) so a resume with another base is told. A base built fresh from a `config` is kept
whole in every checkpoint: it exists nowhere else.

QLoRA (`quantize: 4bit` or `8bit`) loads a pretrained base quantised by bitsandbytes, which needs a CUDA GPU.
"""

from __future__ import annotations

import importlib.util
import json
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from launcher.components import ArgumentProblem, describe, optional
from launcher.layout import ADAPTER_CONFIG_FILE, LORA_BASE_FILE

KEYS = ("r", "rank", "alpha", "dropout", "target_modules", "modules_to_save", "quantize")
QUANTIZE = {"4bit": "4-bit", "8bit": "8-bit"}
ALL_LINEAR = "all-linear"
TASKS = {"AutoModelForCausalLM": "CAUSAL_LM", "AutoModelForSequenceClassification": "SEQ_CLS"}
NAMES_SHOWN = 12
BASE_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


@dataclass(frozen=True)
class Lora:
    """The recipe's `model.lora`, as peft's `LoraConfig` takes it."""

    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    target_modules: str | list[str] = ALL_LINEAR
    modules_to_save: list[str] = field(default_factory=list)
    quantize: str | None = None


def problems(lora: Any, pretrained: Any = None) -> list[tuple[str, str]]:
    """(argument, problem) pairs for a `lora` section, without building anything (a pure decision but for
    whether this machine has CUDA and bitsandbytes, which `quantize` needs)."""
    if lora is None:
        return []
    if not isinstance(lora, Mapping):
        return [("lora", f"expected a section {{r: 8, alpha: 16, target_modules: [...]}}, got {describe(lora)}")]
    found = [("lora." + k, f"unknown key (expected: {', '.join(KEYS)})") for k in lora if k not in KEYS]
    if "r" in lora and "rank" in lora:
        found.append(("lora.rank", "give r or rank, not both"))
    rank = lora.get("r", lora.get("rank", 8))
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        found.append(("lora.r", f"expected an integer >= 1, got {describe(rank)}"))
    alpha = lora.get("alpha", 16)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        found.append(("lora.alpha", f"expected a number > 0, got {describe(alpha)}"))
    dropout = lora.get("dropout", 0.0)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        found.append(("lora.dropout", f"expected a number in [0, 1), got {describe(dropout)}"))
    targets = lora.get("target_modules", ALL_LINEAR)
    if targets != ALL_LINEAR and not names(targets):
        found.append(
            ("lora.target_modules", f"expected {ALL_LINEAR} or a list of module names, got {describe(targets)}")
        )
    if "modules_to_save" in lora and not names(lora["modules_to_save"]):
        found.append(
            ("lora.modules_to_save", f"expected a list of module names, got {describe(lora['modules_to_save'])}")
        )
    problem = quantize_problem(lora.get("quantize"), pretrained, torch.cuda.is_available(), has_bitsandbytes())
    return found + ([("lora.quantize", problem)] if problem else [])


def names(value: Any) -> list[str]:
    """A non-empty list of names, or []."""
    ok = isinstance(value, list) and value and all(isinstance(v, str) and v for v in value)
    return list(value) if ok else []


def quantize_problem(quantize: Any, pretrained: Any, cuda: bool, bitsandbytes: bool) -> str | None:
    """Why `quantize` cannot be had here, or None."""
    if quantize is None:
        return None
    if quantize not in QUANTIZE:
        return f"expected one of: {', '.join(QUANTIZE)}, got {describe(quantize)}"
    if not (cuda and bitsandbytes):
        return f"{QUANTIZE[quantize]} bases need a CUDA GPU and bitsandbytes"
    if pretrained is None:
        return "a quantised base is loaded from pretrained weights: give model.pretrained, not a config"
    return None


def has_bitsandbytes() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


def parse(lora: Mapping[str, Any]) -> Lora:
    """The checked section (see `problems`) as a `Lora`."""
    return Lora(
        r=int(lora.get("r", lora.get("rank", 8))),
        alpha=float(lora.get("alpha", 16)),
        dropout=float(lora.get("dropout", 0.0)),
        target_modules=lora.get("target_modules", ALL_LINEAR),
        modules_to_save=list(lora.get("modules_to_save", [])),
        quantize=lora.get("quantize"),
    )


def load_options(lora: Mapping[str, Any] | None) -> dict[str, Any]:
    """What `from_pretrained` takes to load a quantised base (QLoRA); nothing otherwise."""
    if lora is None or lora.get("quantize") is None:
        return {}
    transformers = optional("transformers", "hf")
    if lora["quantize"] == "8bit":
        return {"quantization_config": transformers.BitsAndBytesConfig(load_in_8bit=True)}
    quantization = transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    return {"quantization_config": quantization}


def linear_names(model: torch.nn.Module) -> list[str]:
    """The distinct last names of the model's Linear layers (q_proj, v_proj, ...), in the model's order."""
    seen = {name.rpartition(".")[2]: None for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    return list(seen)


def target_problem(model: torch.nn.Module, targets: str | list[str]) -> str | None:
    """Why peft would find none of some target modules in the model (its match: a module's full name or the end of
    one after a dot), naming the Linear layers it has; None when every target names one."""
    if targets == ALL_LINEAR:
        return None
    modules = [name for name, _ in model.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in modules)]
    if not missing:
        return None
    has = linear_names(model)
    shown = ", ".join(has[:NAMES_SHOWN]) + (", ..." if len(has) > NAMES_SHOWN else "")
    return f"{', '.join(missing)}: no such module in {type(model).__name__} (its linear layers: {shown})"


def apply(model: torch.nn.Module, lora: Mapping[str, Any], auto_class: str, pretrained: str | None) -> torch.nn.Module:
    """The model with LoRA adapters injected (trainable) and everything else frozen, but `modules_to_save` (and a
    classifier's fresh head, which peft keeps trainable for sequence classification)."""
    peft = optional("peft", "hf")
    spec = parse(lora)
    problem = target_problem(model, spec.target_modules)
    if problem:
        raise ArgumentProblem("lora.target_modules", problem)
    for name in spec.modules_to_save:
        if not any(n == name or n.endswith("." + name) for n, _ in model.named_modules()):
            raise ArgumentProblem("lora.modules_to_save", f"{name}: no such module in {type(model).__name__}")
    if spec.quantize is not None:
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    config = peft.LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=spec.target_modules,
        modules_to_save=spec.modules_to_save or None,
        task_type=TASKS.get(auto_class),
        base_model_name_or_path=pretrained,
    )
    try:
        with warnings.catch_warnings():  # peft asks transformers a deprecated question; nothing the user can change
            warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
            wrapped = peft.get_peft_model(model, config)
    except ValueError as e:  # a module type peft cannot adapt
        raise ArgumentProblem("lora.target_modules", str(e).splitlines()[0]) from None
    inner = wrapped.get_base_model()
    inner.lora_base = base_record(pretrained)
    return inner


def base_record(pretrained: str | None) -> dict[str, Any]:
    """Which base the adapters train on: its `pretrained` directory (absolute) or Hub name, and the size and
    modification time of its config and weights files, by which a resume tells a changed base; None for a base
    built from a config (kept whole in the checkpoints)."""
    if pretrained is None:
        return {"pretrained": None, "files": {}}
    path = Path(pretrained).expanduser()
    if not path.is_dir():
        return {"pretrained": pretrained, "files": {}}
    files = {}
    for name in sorted(os.listdir(path)):
        if name in BASE_FILES or (name.endswith(".safetensors") and name.startswith("model-")):
            stat = (path / name).stat()
            files[name] = [stat.st_size, stat.st_mtime_ns]
    return {"pretrained": str(path.resolve()), "files": files}


def is_lora(model: torch.nn.Module) -> bool:
    return hasattr(model, "lora_base") and hasattr(model, "peft_config")


def adapter_only(model: torch.nn.Module) -> bool:
    """Whether checkpoints of `model` hold only its trainable parameters: a LoRA model on a pretrained base."""
    return is_lora(model) and model.lora_base["pretrained"] is not None


def files(model: torch.nn.Module) -> dict[str, bytes]:
    """The files every checkpoint of a LoRA model keeps beside the base's config: peft's adapter config and the
    base it was trained on (`LORA_BASE_FILE`); none for another model."""
    if not is_lora(model):
        return {}
    config = {k: sorted(v) if isinstance(v, set) else v for k, v in model.peft_config["default"].to_dict().items()}
    return {
        ADAPTER_CONFIG_FILE: json.dumps(config, indent=2, sort_keys=True).encode(),
        LORA_BASE_FILE: json.dumps({**model.lora_base, "adapter_only": adapter_only(model)}, indent=2).encode(),
    }


def base_change(saved: Mapping[str, Any], model: torch.nn.Module) -> str | None:
    """A warning when the base a checkpoint was trained on (its `LORA_BASE_FILE`) is not the one this run loaded."""
    if not is_lora(model) or saved.get("pretrained") is None:
        return None
    now = model.lora_base
    if now["pretrained"] != saved["pretrained"]:
        return (
            f"warning: the checkpoint's adapters were trained on {saved['pretrained']}; this run's base is "
            f"{now['pretrained']}"
        )
    if now["files"] != saved["files"]:
        return f"warning: the base model's files in {now['pretrained']} changed since the checkpoint was written"
    return None
