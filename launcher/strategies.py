"""Strategies: how the training state is spread over processes (DDP, FSDP2, DeepSpeed ZeRO).

The decisions are pure functions of the recipe (the DeepSpeed config, memory per process), tested without
processes; the few functions that act on a model import torch.distributed where they run, so the recipe layer can
use the pure ones without it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from launcher.recipe import Recipe

# Values of a DeepSpeed config that the recipe decides; a user's JSON file may repeat them, not contradict them.
RECIPE_OWNED = (
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "train_batch_size",
    "gradient_clipping",
    "zero_optimization.stage",
    "bf16.enabled",
    "fp16.enabled",
)
# Sections the recipe builds itself (optimizer, schedule): DeepSpeed must not build a second one.
REFUSED_SECTIONS = ("optimizer", "scheduler")


def deepspeed_config(recipe: Recipe, processes: int, user: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The DeepSpeed config a run uses: batch sizes, accumulation, clipping and precision from the recipe (so they
    cannot disagree), ZeRO options from `strategy.deepspeed`, and the user's JSON merged in for everything else."""
    t, ds = recipe.train, recipe.strategy.deepspeed
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu"}
    generated: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "train_batch_size": t.batch_size * t.gradient_accumulation_steps * processes,
        # DeepSpeed clips, once, with the global norm after the reduction; the loop only reads the norm back.
        "gradient_clipping": t.clip_grad_norm or 0.0,
        "zero_optimization": zero,
        "bf16": {"enabled": t.mixed_precision == "bf16"},
        "fp16": {"enabled": t.mixed_precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "zero_allow_untested_optimizer": True,  # the recipe's torch optimizer
        "steps_per_print": 2**31 - 1,  # progress is the launcher's to report
        "wall_clock_breakdown": False,
    }
    return _merge(dict(user or {}), generated)


def _merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def read_user_config(path: str) -> tuple[dict[str, Any] | None, str | None]:
    """A user's DeepSpeed JSON file, or the problem with it."""
    file = Path(path)
    if not file.is_file():
        return None, f"{path} is not a file"
    try:
        value = json.loads(file.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        return None, f"{path} is not valid JSON ({e})"
    if not isinstance(value, dict):
        return None, f"{path} must hold a JSON object"
    return value, None


def user_config_problems(recipe: Recipe, user: Mapping[str, Any]) -> list[str]:
    """Where a user's DeepSpeed JSON contradicts the recipe (`"auto"` always agrees)."""
    generated = deepspeed_config(recipe, processes=1)
    problems = []
    for dotted in RECIPE_OWNED:
        if dotted == "train_batch_size":
            continue  # depends on the world size; DeepSpeed checks it against the other two
        theirs, ours = _get(user, dotted), _get(generated, dotted)
        if theirs is not None and theirs != "auto" and theirs != ours:
            problems.append(
                f"sets {dotted}={json.dumps(theirs)} but the recipe gives {json.dumps(ours)}; the recipe decides "
                f"this (train.* or strategy.deepspeed.*): remove it from the file or make them agree"
            )
    for section in REFUSED_SECTIONS:
        if section in user:
            problems.append(f"has an '{section}' section; the recipe's {section} is used, so remove it from the file")
    return problems


def _get(config: Mapping[str, Any], dotted: str) -> Any:
    value: Any = config
    for part in dotted.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


# ---------------------------------------------------------------------------------------------------- memory


def optimizer_slots(optimizer_name: str, kwargs: Mapping[str, Any]) -> int:
    """Tensors of parameter size an optimizer keeps per parameter (Adam: 2 moments; SGD: momentum or none)."""
    name = optimizer_name.rsplit(".", 1)[-1].lower()
    if name == "sgd":
        return 1 if kwargs.get("momentum", 0) else 0
    if name in ("adagrad", "rmsprop", "adadelta"):
        return 1 if name != "adadelta" else 2
    return 2  # adam, adamw, nadam, radam, adamax, lamb...


def memory_per_process(
    params: int, strategy: str, zero_stage: int, processes: int, mixed_precision: str, slots: int
) -> dict[str, float]:
    """Bytes of parameters, gradients and optimizer state each process holds in steady state (activations and
    transient all-gather buffers not counted), as in the ZeRO paper's accounting.

    DDP and FSDP keep fp32 parameters (autocast or FSDP's MixedPrecisionPolicy computes in 16 bits); DeepSpeed
    with 16-bit precision keeps 16-bit parameters and gradients plus an fp32 master copy in the optimizer state.
    """
    half = mixed_precision in ("bf16", "fp16")
    if strategy == "deepspeed" and half:
        p_bytes, g_bytes, o_bytes = 2 * params, 2 * params, (4 + 4 * slots) * params
    else:
        p_bytes, g_bytes, o_bytes = 4 * params, 4 * params, 4 * slots * params
    n = max(processes, 1)
    if strategy == "fsdp":
        p_bytes, g_bytes, o_bytes = p_bytes / n, g_bytes / n, o_bytes / n
    elif strategy == "deepspeed":
        o_bytes /= n  # ZeRO-1
        if zero_stage >= 2:
            g_bytes /= n
        if zero_stage >= 3:
            p_bytes /= n
    return {"parameters": p_bytes, "gradients": g_bytes, "optimizer": o_bytes}


# ---------------------------------------------------------------------------------------------------- FSDP


def fsdp_shard(model: torch.nn.Module, recipe: Recipe, device: torch.device) -> torch.nn.Module:
    """Apply FSDP2's `fully_shard` to each module of the `wrap` classes, then to the root (which holds the rest).

    Raises ValueError naming the model's module classes when a `wrap` class is not among them.
    """
    import torch
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    cfg = recipe.strategy.fsdp
    present = {type(m).__name__ for m in model.modules()}
    missing = [name for name in cfg.wrap if name not in present]
    if missing:
        raise ValueError(
            f"strategy.fsdp.wrap: the model has no module of class {', '.join(missing)}; "
            f"its classes are: {', '.join(sorted(present))}"
        )
    model.to(device)
    units = [m for m in model.modules() if type(m).__name__ in cfg.wrap]
    if cfg.activation_checkpointing:
        from torch.distributed._composable import checkpoint

        for unit in units:
            checkpoint(unit)
    options: dict[str, Any] = {"reshard_after_forward": cfg.reshard_after_forward}
    if recipe.train.mixed_precision == "bf16":
        # Compute and all-gather in bf16; gradients are reduced and the sharded master weights kept in fp32.
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if cfg.cpu_offload:
        # (Pinned host memory needs CUDA; on a CPU-only machine the shards stay where they are anyway.)
        options["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
    for unit in units:
        fully_shard(unit, **options)
    fully_shard(model, **options)
    return model
