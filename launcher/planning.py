"""`launcher plan` as a command: the recipe, its data where it is there, its model built on the meta device, and
what `plan.py` makes of them."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from launcher.errors import RecipeError


def describe(path: str, overrides: Sequence[str], processes: int | None) -> str:
    """The plan of a recipe, on `processes` processes (default: WORLD_SIZE or 1), as `launcher plan` prints it."""
    from launcher import activations, components, guards, plan
    from launcher.recipe import load_recipe

    recipe = load_recipe(path, overrides, check_files=False, this_machine=False)  # a plan for any machine
    processes = processes or guards.launched_world(os.environ)
    if processes < 1:
        raise RecipeError(f"--processes: must be >= 1, got {processes}")
    from launcher import strategies

    problems = strategies.choose(recipe, processes).world_problems()
    if problems:
        raise RecipeError(problems)
    try:
        train_set = components.instantiate("data", recipe.data.train, key="data.train")
    except (RecipeError, OSError) as e:  # the data is not there yet: plan from max_steps and the recipe
        text = str(e.problems[0] if isinstance(e, RecipeError) else e)
        train_set, missing = None, text.split(" (LAUNCHER_FULL_ERROR")[0].split("failed: ")[-1]
    else:
        missing = ""
    model_kwargs = getattr(train_set, "model_kwargs", None)
    if train_set is not None and not hasattr(train_set, "__len__"):  # a stream: no length, no sample to look at
        train_set, missing = None, "a stream, read as it goes: no length"
    samples = None if train_set is None else len(train_set)
    made = plan.make_plan(recipe, samples, processes)
    # Without the data, the sizes the dataset would tell the model (block_size, vocab_size) come from the recipe.
    if model_kwargs is None:
        model_kwargs = {k: v for k, v in recipe.data.train.kwargs.items() if k in ("block_size", "vocab_size")}
    tokens = _tokens_per_sample(train_set) if train_set is not None else int(model_kwargs.get("block_size", 0))
    model = _meta_model(recipe, model_kwargs)
    parameters = None if model is None else sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    groups = plan.describe_groups(recipe, model)
    text = plan.describe_plan(recipe, made, samples, tokens, parameters, missing, groups, model)
    return "\n".join([text, *activations.describe(recipe, _sample(train_set, model_kwargs), model_kwargs)])


def _sample(dataset: Any, model_kwargs: dict[str, Any]) -> Any:
    """One (input, target) of the train set; without it, token ids of the recipe's block_size where it gives one."""
    import torch

    if dataset is not None:
        return dataset[0]
    block = int(model_kwargs.get("block_size") or 0)
    return (torch.zeros(block, dtype=torch.long),) * 2 if block else None


def _tokens_per_sample(dataset: Any) -> int:
    """Tokens in one sample of a sequence dataset (integer targets of one or more dimensions); 0 otherwise."""
    import torch

    from launcher.batches import sequence_tokens, split

    target = split(dataset[0])[1]
    return sequence_tokens(target[None]) if isinstance(target, torch.Tensor) else 0


def _meta_model(recipe: Any, model_kwargs: dict[str, Any]) -> Any:
    """The model built on the meta device, so no memory is allocated (None: it does not build there). Its
    parameters are counted tied ones once."""
    import torch

    from launcher import components

    try:
        with torch.device("meta"):
            return components.instantiate("model", recipe.model, **model_kwargs)
    except Exception:  # a model that cannot be built on the meta device: no estimate
        return None
