"""Recipes: YAML loading, `base:` composition, `a.b=c` overrides, the typed schema and its validation.

A recipe is read once, here. Everything after `load_recipe` sees a frozen `Recipe` of plain values; every problem
found on the way is collected and raised together as one `RecipeError`, one line per problem.

The package, one job per module, each importing only those before it:
`schema` (the dataclasses) <- `dialect` (YAML, `base:`, overrides) <- `build` (typed building) <-
`component_checks`, `checks` (values, ranges, combinations) <- here (the entry points).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from launcher.errors import RecipeError, say
from launcher.recipe.build import Built, build_recipe
from launcher.recipe.checks import MAX_TIMEOUT_S, MAX_WORKERS, check_values, deprecations
from launcher.recipe.dialect import apply_overrides, base_override, compose, deep_merge, parse_yaml, read_yaml_file
from launcher.recipe.schema import (
    BUILT_IN_TRACKERS,
    MISSING,
    TRACKERS,
    CheckpointConfig,
    DataConfig,
    DeepSpeedConfig,
    EarlyStoppingConfig,
    EvalConfig,
    FSDPConfig,
    LoggingConfig,
    ProfileConfig,
    Recipe,
    SlurmConfig,
    StrategyConfig,
    TrainConfig,
    dump,
)

__all__ = [
    "BUILT_IN_TRACKERS",
    "MAX_TIMEOUT_S",
    "MAX_WORKERS",
    "MISSING",
    "TRACKERS",
    "Built",
    "CheckpointConfig",
    "DataConfig",
    "DeepSpeedConfig",
    "EarlyStoppingConfig",
    "EvalConfig",
    "FSDPConfig",
    "LoggingConfig",
    "ProfileConfig",
    "Recipe",
    "SlurmConfig",
    "StrategyConfig",
    "TrainConfig",
    "apply_overrides",
    "base_override",
    "build_recipe",
    "check_values",
    "compose",
    "deep_merge",
    "dump",
    "load_recipe",
    "parse_yaml",
    "read_yaml_file",
    "validate",
]


def load_recipe(
    path: str | Path,
    overrides: Sequence[str] = (),
    check_files: bool = True,
    this_machine: bool = True,
    read_resume: bool = True,
    build_data: bool = False,
) -> Recipe:
    """Read, compose, override and validate a recipe, or raise RecipeError listing every problem.

    The recipe's folder becomes importable, as a script's folder is, so `_component_: mymodels.Net` finds a
    `mymodels.py` kept beside the recipe. Without `check_files`, data files need not exist yet (`launcher plan`).
    Without `this_machine`, nothing is checked against this machine (its GPU, its memory): the recipe is for
    another one (`launcher slurm submit` on a login node, `launcher plan`). Without `read_resume`, a checkpoint
    named by `resume` is looked for but not read (its checksums): `launcher train`'s start reads it right after,
    on every process, with the same line for what it refuses. With `build_data`, a tokenized dataset is built
    into its cache (`launcher train`, which then maps it); without, its files are read from their start only and
    nothing is written.
    """
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: no such recipe file")
    bases, overrides, base_problems = base_override(overrides, str(path))
    raw = compose(path, bases=bases)
    raw, override_problems = apply_overrides(raw, overrides, source=str(path))
    recipe_dir = str(path.resolve().parent)
    if recipe_dir not in sys.path:
        sys.path.insert(0, recipe_dir)
    problems = [*base_problems, *override_problems]
    return validate(raw, str(path), path.stem, problems, check_files, this_machine, read_resume, build_data)


def validate(
    raw: Mapping[str, Any],
    source: str,
    default_name: str = "run",
    problems: Sequence[str] = (),
    check_files: bool = True,
    this_machine: bool = True,
    read_resume: bool = True,
    build_data: bool = False,
) -> Recipe:
    """The typed, frozen recipe, or RecipeError with every problem found (and `problems` found before), one
    line each. `check_files`, `this_machine`, `read_resume` and `build_data` as in `load_recipe`."""
    found: list[str] = list(problems)
    built = build_recipe(raw, source, default_name, found)
    if built.recipe is not None:
        # Values that failed their type check stand at their defaults here: their range checks would only repeat
        # or mislead, so problems under those keys, or that reason about them, are left out.
        # With problems found already, nothing is built for the rest (see check_values): the refusal comes fast.
        for problem in check_values(
            built.recipe, check_files, this_machine, read_resume, build=not found, build_data=build_data
        ):
            if not built.about_bad_keys(problem):
                found.append(f"{source}: {problem}")
    if found:
        raise RecipeError(built.relocate(found))
    assert built.recipe is not None
    if os.environ.get("RANK", "0") == "0":  # once per launch, not once per process
        for note in deprecations(built.recipe):
            say(note)
    return built.recipe
