"""Checks of how the processes were launched, against the recipe and against what Accelerate made of it.

Pure functions of the environment and a few values, so they are tested without launching anything.
"""

from __future__ import annotations

from collections.abc import Mapping

from launcher import strategies


def launched_world(env: Mapping[str, str]) -> int:
    """The number of processes the launcher (accelerate launch, torchrun, srun) started: WORLD_SIZE, else 1."""
    return int(env.get("WORLD_SIZE", "1") or 1)


def launch_problems(
    env: Mapping[str, str], mixed_precision: str, strategy: str, gradient_accumulation_steps: int
) -> list[str]:
    """Where `accelerate launch` flags (seen as ACCELERATE_* variables) and the recipe disagree, or the process
    environment would make Accelerate quietly run each process alone. Launch defaults (no mixed precision, no
    accumulation) are not disagreements: the recipe decides those."""
    problems = []
    world = launched_world(env)
    if world > 1 and "LOCAL_RANK" not in env:
        problems.append(
            f"launch: WORLD_SIZE={world} is set but LOCAL_RANK is not, so each process would train alone; start the "
            "processes with accelerate launch or torchrun, or give each RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT"
        )
    launched_mp = env.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if launched_mp not in ("", "no") and launched_mp != mixed_precision:
        problems.append(
            f"train.mixed_precision: the recipe says {mixed_precision} but accelerate launch says {launched_mp}; "
            f"drop --mixed_precision or make them agree"
        )
    problems += strategies.launch_problems(env, strategy)
    launched_ga = env.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "1")
    if launched_ga not in ("", "1") and launched_ga != str(gradient_accumulation_steps):
        problems.append(
            f"train.gradient_accumulation_steps: the recipe says {gradient_accumulation_steps} but accelerate launch "
            f"says {launched_ga}; drop --gradient_accumulation_steps or make them agree"
        )
    return problems


def world_problem(env: Mapping[str, str], num_processes: int, distributed_type: str) -> str | None:
    """After Accelerate started: the processes the launcher started should all be in one process group."""
    world = launched_world(env)
    if world > 1 and (num_processes != world or distributed_type.endswith("NO")):
        return (
            f"launch: {world} processes were started (WORLD_SIZE={world}) but Accelerate set up {num_processes} "
            f"({distributed_type}), so each would train alone; check the accelerate launch flags and the strategy"
        )
    return None
