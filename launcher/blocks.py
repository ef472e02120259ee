"""The model's repeated blocks (a transformer's layers): what activation checkpointing recomputes, what regional
compilation compiles one by one, and FSDP's units.

A recipe names their classes in `train.blocks`; without it, the model's own declaration is used: Hugging Face
models list theirs in `_no_split_modules`, and the built-in GPT does the same.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from launcher.errors import RecipeError
from launcher.recipe.schema import Recipe


def declared(model: torch.nn.Module) -> tuple[str, ...]:
    """The block classes `model` declares (`_no_split_modules`, the Hugging Face convention)."""
    names = getattr(model, "_no_split_modules", None) or ()
    return tuple(str(n) for n in names)


def block_names(model: torch.nn.Module, recipe: Recipe) -> tuple[str, ...]:
    """The block classes of this run: `train.blocks`, else `strategy.fsdp.wrap`, else the model's declaration."""
    return recipe.train.blocks or recipe.strategy.fsdp.wrap or declared(model)


def recompute_every(recipe: Recipe) -> int:
    """`train.activation_checkpointing` as every how many blocks (0: none); FSDP's old switch means every one."""
    every = recipe.train.activation_checkpointing.every
    return every or (1 if recipe.strategy.fsdp.activation_checkpointing else 0)


def run_blocks(model: torch.nn.Module, recipe: Recipe) -> list[torch.nn.Module]:
    """This run's blocks of `model`; RecipeError when the recipe names what the model lacks (see `problem`)."""
    found = problem(model, recipe)
    if found:
        raise RecipeError(found)
    return find_blocks(model, block_names(model, recipe))


def problem(model: torch.nn.Module, recipe: Recipe) -> str | None:
    """`key: ...` when the recipe names a block class the model lacks, or asks to recompute blocks of a model
    that declares none; `launcher validate` asks this of the model built on the meta device."""
    names = block_names(model, recipe)
    key = "train.blocks" if recipe.train.blocks else "strategy.fsdp.wrap" if recipe.strategy.fsdp.wrap else ""
    found = missing_problem(key, model, names) if key else None
    if found is None and not names and recompute_every(recipe):
        found = (
            "train.activation_checkpointing: the model declares no blocks to recompute; name their classes in "
            "train.blocks (e.g. [Block])"
        )
    return found


def missing(model: torch.nn.Module, names: tuple[str, ...]) -> list[str]:
    present = {type(m).__name__ for m in model.modules()}
    return [n for n in names if n not in present]


def missing_problem(key: str, model: torch.nn.Module, names: tuple[str, ...]) -> str | None:
    """`key: ...` when some of `names` is not a module class of `model`, naming the classes it has."""
    absent = missing(model, names)
    if not absent:
        return None
    present = sorted({type(m).__name__ for m in model.modules()})
    return f"{key}: the model has no module of class {', '.join(absent)}; its classes are: {', '.join(present)}"


def find_blocks(model: torch.nn.Module, names: tuple[str, ...]) -> list[torch.nn.Module]:
    """The modules of the `names` classes in `model`, outermost only (a block inside a block is part of it), in
    the order of `model.modules()`."""
    found: list[torch.nn.Module] = []
    inside: set[int] = set()
    for module in model.modules():
        if id(module) in inside:
            continue
        if type(module).__name__ in names:
            found.append(module)
            inside.update(id(m) for m in module.modules())
    return found


def recomputed(count: int, every: int) -> list[bool]:
    """Which of `count` blocks recompute their activations in backward: none (0), all (1), or every `every`-th
    one, starting with the first."""
    return [every > 0 and i % every == 0 for i in range(count)]


def recompute_in_backward(block: torch.nn.Module) -> None:
    """Make `block` keep only its inputs in forward and run forward again in backward (torch's non-reentrant
    activation checkpointing). The RNG state is saved and restored around the recomputation, so dropout draws
    the same masks and the gradients equal those without it. In place: parameter names, and so checkpoints, do
    not change, and `compile` and FSDP's `fully_shard` apply to the block as to any module."""
    block.forward = types.MethodType(_forward_recomputed, block)


def _forward_recomputed(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
    return checkpoint(type(self).forward, self, *args, use_reentrant=False, **kwargs)


def checkpoint_blocks(blocks: list[torch.nn.Module], every: int) -> int:
    """Apply activation checkpointing to every `every`-th block; how many."""
    chosen = [b for b, on in zip(blocks, recomputed(len(blocks), every), strict=True) if on]
    for block in chosen:
        recompute_in_backward(block)
    return len(chosen)
