"""Strategies: how the training state is spread over processes. One object per run, chosen from the recipe,
owns everything that differs between them (see `base.DDP` for the interface); nothing outside this package
compares strategy names.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from launcher.strategies.base import DDP, launch_flag_set
from launcher.strategies.deepspeed import DeepSpeed, deepspeed_config, read_user_config, user_config_problems
from launcher.strategies.fsdp import FSDP, fsdp_shard
from launcher.strategies.memory import optimizer_slots
from launcher.strategies.wrappers import unwrap

if TYPE_CHECKING:
    from launcher.recipe.schema import Recipe

STRATEGIES: dict[str, type[DDP]] = {cls.name: cls for cls in (DDP, FSDP, DeepSpeed)}

__all__ = [
    "DDP",
    "FSDP",
    "STRATEGIES",
    "DeepSpeed",
    "choose",
    "deepspeed_config",
    "fsdp_shard",
    "launch_problems",
    "memory_per_process",
    "optimizer_slots",
    "read_user_config",
    "unwrap",
    "user_config_problems",
]


def choose(recipe: Recipe, processes: int) -> DDP:
    """The recipe's strategy for a launch of `processes` processes."""
    return STRATEGIES[recipe.strategy.name](recipe, processes)


def recipe_problems(recipe: Recipe) -> list[str]:
    """What the recipe's strategy settings get wrong, each `key.path: message`."""
    s = recipe.strategy
    chosen = STRATEGIES[s.name]
    problems = []
    for cls in STRATEGIES.values():
        section = cls.section
        if section and cls is not chosen and getattr(s, section) != type(getattr(s, section))():
            problems.append(f"strategy.{section}: set, but strategy.name is {s.name}; set strategy.name={section}")
    if s.tp.size < 1:
        problems.append(f"strategy.tp.size: must be >= 1, got {s.tp.size}")
    elif s.tp.size == 1 and s.tp.plan:
        problems.append("strategy.tp.plan: set, but strategy.tp.size is 1; set the size of the tensor-parallel groups")
    elif s.tp.size > 1 and chosen is not FSDP:
        problems.append(
            f"strategy.tp: tensor parallelism runs with FSDP2 across the tensor-parallel groups, not with "
            f"strategy.name={s.name}; set strategy.name=fsdp"
        )
    if chosen.sharded and recipe.checkpoint.async_save:
        problems.append(
            f"checkpoint.async_save: not available with strategy.name={s.name} (every process writes its shard, "
            "together); set it to false"
        )
    return problems + chosen(recipe, 1).problems()


def launch_problems(env: Mapping[str, str], name: str) -> list[str]:
    """Where `accelerate launch --use_fsdp/--use_deepspeed` names another strategy than the recipe."""
    chosen = STRATEGIES[name]
    return [
        f"strategy.name: the recipe says {name} but accelerate launch says {other} (--use_{other}); the recipe "
        f"chooses the strategy, so drop the flag or set strategy.name"
        for other, cls in STRATEGIES.items()
        if cls is not chosen and launch_flag_set(env, cls.launch_flag)
    ]


def memory_per_process(
    params: int, strategy: str, zero_stage: int, processes: int, mixed_precision: str, slots: int
) -> dict[str, float]:
    """Bytes of parameters, gradients and optimizer state each process holds in steady state (activations and
    transient all-gather buffers not counted), as in the ZeRO paper's accounting."""
    # The few recipe values the estimate reads.
    facts: Any = SimpleNamespace(
        train=SimpleNamespace(mixed_precision=mixed_precision),
        strategy=SimpleNamespace(deepspeed=SimpleNamespace(zero_stage=zero_stage), tp=SimpleNamespace(size=1)),
    )
    return STRATEGIES[strategy](facts, processes).memory(params, slots)
