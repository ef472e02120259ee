"""What a recipe's components would refuse or fail on, found before anything is built for real.

Every component must resolve and take the recipe's arguments. The built-in models and datasets also check their
values themselves (a pure `check_args`); what the train set tells the model, its length and its memory come from
its arguments where they tell them (synthetic data) or from building it where that is cheap (memory-mapped tokens,
a text file), and a built-in model is built on the meta device with what the data tells it, as training builds it,
so that its constructor's complaints come out here, with the line training would give. Checks that depend on the
machine (its memory, its world size) run only with `this_machine`.

Each problem is `key.path: message`.
"""

from __future__ import annotations

import inspect
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from launcher import components, param_groups, schedules
from launcher.components import INT64_MAX, Component, describe, finite_number
from launcher.data import DataFacts
from launcher.errors import RecipeError

if TYPE_CHECKING:
    from launcher.recipe.schema import Recipe


def check_component(
    key: str,
    section: str,
    spec: Component,
    passed: tuple[str, ...] = (),
    extra: tuple[str, ...] = (),
    check_files: bool = True,
) -> list[str]:
    """The spec resolves, takes its arguments, values fit their type hints, and named data files exist."""
    try:
        fn = components.resolve(section, spec.target)
    except components.ResolveError as e:
        return [f"{key}._component_: {e}"]
    problems = [f"{key}.{arg}: {msg}" for arg, msg in components.argument_problems(fn, spec.kwargs, passed, extra)]
    if section == "data" and check_files and spec.short_name in components.DATASET_PATH_ARGS:
        for arg in components.DATASET_PATH_ARGS[spec.short_name]:
            value = spec.kwargs.get(arg)
            if value is None:
                problems.append(f"{key}.{arg}: missing required value (a file path)")
            elif isinstance(value, str):
                split = spec.kwargs.get("split", "train")
                file = Path(value.replace("{split}", str(split)))
                if not file.is_file():
                    where = "" if file.is_absolute() else f" (relative paths start at {Path.cwd()})"
                    problems.append(f"{key}.{arg}: file not found: {file}{where}")
    return problems


def machine_memory() -> int:
    """This machine's physical memory in bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def too_big(key: str, what: str, size: int, this_machine: bool) -> list[str]:
    """`what` takes `size` bytes: more than this machine has, or than any machine could address."""
    if size > INT64_MAX:
        return [f"{key}: {what} take {size:.3g} bytes, more than any machine's memory"]
    if this_machine and size > machine_memory():
        return [f"{key}: {what} take {_gib(size)}, more than this machine's {_gib(machine_memory())} of memory"]
    return []


# ---------------------------------------------------------------------------------------------------- model


def check_model(recipe: Recipe, facts: DataFacts | None, this_machine: bool) -> list[str]:
    """The model is built on the meta device (no memory) with what the train set tells it, as training builds it,
    so that what its constructor refuses comes out here, with the line training would give; then it must be a
    module with parameters to train, of the size memory allows, with the blocks the recipe names. A built-in
    model first checks its arguments against what the data tells it."""
    spec = recipe.model
    problems = check_component("model", "model", spec)
    if problems:
        return problems
    fn = components.resolve("model", spec.target)
    told = facts.model_kwargs if facts else {}
    if not components.is_built_in(fn):
        # The user's model: without what the data tells it (the user's dataset is not built here), a failure may
        # be only the missing data's, so it is left to training.
        return _build_on_meta(recipe, told, this_machine, sure=facts is not None)
    if told and not any(components.accepts(fn, name) for name in told):
        return [
            f"model._component_: {spec.target} takes none of what {recipe.data.train.target} tells the model "
            f"({', '.join(told)}): it is made for other data"
        ]
    data = {k: v for k, v in told.items() if components.accepts(fn, k)}
    given = dict(spec.kwargs)
    args = components.effective_args(fn, {**data, **given})
    # A value that came from the data (and not the recipe) is the data's problem, reported under its key.
    problems = [f"model.{arg}: {msg}" for arg, msg in fn.check_args(args, data) if arg in given or arg not in data]
    if problems or facts is None:
        return problems
    return _build_on_meta(recipe, data, this_machine, sure=True)


def check_model_args(recipe: Recipe) -> list[str]:
    """What the model refuses of the recipe's own arguments, before the data tells it anything (a built-in model's
    `check_args`), so that it is refused before a costly set is opened."""
    problems = check_component("model", "model", recipe.model)
    if problems:
        return problems
    fn = components.resolve("model", recipe.model.target)
    if not components.is_built_in(fn):
        return []
    given = dict(recipe.model.kwargs)
    args = components.effective_args(fn, given)
    return [f"model.{arg}: {msg}" for arg, msg in fn.check_args(args, {}) if arg in given]


def built_in_model(recipe: Recipe) -> bool:
    try:
        return components.is_built_in(components.resolve("model", recipe.model.target))
    except components.ResolveError:
        return False


def _build_on_meta(recipe: Recipe, data: dict[str, Any], this_machine: bool, sure: bool) -> list[str]:
    """The model built on the meta device: what its constructor refuses (`sure`: the constructor got all it
    will get in training; a failure that only the meta device causes is left to training), something that is
    not a module with trainable parameters, parameters beyond memory, blocks the recipe names that the model
    lacks, and `optimizer.groups` patterns that match none of its parameters (once the groups' form is right)."""
    import torch

    from launcher import blocks, models
    from launcher.strategies import tensor_parallel

    try:
        with torch.device("meta"):
            model = components.instantiate("model", recipe.model, **data)
    except RecipeError as e:
        return e.problems if sure and not any(_meta_only(line) for line in e.problems) else []
    problem = models.trainable_problem(model, recipe.model.target)
    if problem:
        return [problem]
    count = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    problems = too_big("model", f"its {count:,} parameters", 4 * count, this_machine)
    problems += [p for p in [blocks.problem(model, recipe)] if p]
    problems += tensor_parallel.plan_problems(model, recipe)
    optimizer = recipe.optimizer
    if not param_groups.form_problems(optimizer, None, ""):
        names = (name for name, _ in model.named_parameters())
        problems += param_groups.unmatched(names, param_groups.launcher_keys(optimizer)[2])
    return problems


def _meta_only(line: str) -> bool:
    """A constructor's failure that only the meta device causes (a value read from a tensor, an operation
    without a meta kernel): the model may well build on a real device."""
    # Not any "meta" in the line: a Hub name such as meta-llama/... is the user's problem, not the device's.
    return re.search(r"\bmeta (tensor|device)|'meta'", line, re.IGNORECASE) is not None or "NotImplementedError" in line


# ---------------------------------------------------------------------------------------------------- loss


def check_loss(recipe: Recipe) -> list[str]:
    """The loss builds as training builds it (a module, a function of outputs and targets, or a function that
    makes one); with a built-in dataset (class indices or token ids as targets) it must take class indices.
    Without a loss, the model's own or cross-entropy (nothing to check)."""
    if recipe.loss is None:
        return []
    problems = check_component("loss", "loss", recipe.loss)
    if problems:
        return problems
    from launcher import losses

    try:
        loss = losses.build(recipe.loss)
    except RecipeError as e:
        return e.problems
    try:
        data = components.resolve("data", recipe.data.train.target)
    except components.ResolveError:
        return []  # reported with the data
    if components.is_built_in(data) and losses.takes_float_targets(loss):
        return [
            f"loss: {recipe.loss.target} compares the output with float targets of its shape, but "
            f"{recipe.data.train.target} gives class indices; use cross_entropy"
        ]
    return []


# ---------------------------------------------------------------------------------------------------- optimizer


def _needs_closure(fn: Any) -> bool:
    """Whether an optimizer's `step` requires a closure (LBFGS re-evaluates the loss several times per step)."""
    try:
        closure = inspect.signature(fn.step).parameters.get("closure")
    except (AttributeError, TypeError, ValueError):
        return False
    return closure is not None and closure.default is inspect.Parameter.empty


def _number_problems(key: str, kwargs: dict[str, Any]) -> list[str]:
    """Numbers (also in lists) must be finite floats; an integer beyond 64 bits or a float's range fails in C."""
    problems = []
    for name, value in kwargs.items():
        values = value if isinstance(value, list) else [value]
        numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if any(not finite_number(v) or abs(v) > INT64_MAX for v in numbers):
            problems.append(f"{key}.{name}: expected finite numbers of at most 2**63-1, got {describe(value)}")
    return problems


def check_optimizer(spec: Component, dense_model: bool, trial: bool = True) -> list[str]:
    """The optimizer resolves, takes its arguments and values (its groups' too), and (with `trial`) builds;
    `dense_model`: the model is a built-in one, whose gradients are dense, so the optimizer also takes one step on a
    dense gradient."""
    problems = check_component("optimizer", "optimizer", spec, passed=("params",), extra=param_groups.KEYS)
    if problems:
        return problems
    fn = components.resolve("optimizer", spec.target)
    if _needs_closure(fn):
        return [
            f"optimizer._component_: {spec.target}'s step needs a closure that re-evaluates the loss, which the "
            "training loop does not give; use adamw, adam or sgd"
        ]
    name = components.registry("optimizer").get(spec.short_name or "", spec.target)
    problems = param_groups.form_problems(spec, param_groups.group_options(fn), name)
    if problems:
        return problems
    own, _, groups = param_groups.launcher_keys(spec)
    problems = _value_problems("optimizer", dict(own.kwargs))
    for i, group in enumerate(groups):
        problems += _value_problems(f"optimizer.groups[{i}]", {k: v for k, v in group.items() if k != "params"})
    return problems or (_trial_step(own, groups, dense_model) if trial else [])


def _value_problems(key: str, kwargs: dict[str, Any]) -> list[str]:
    """The optimizer's settings (or a group's) in their ranges."""
    problems = _number_problems(key, kwargs)
    reported = {p.split(":", 1)[0].removeprefix(f"{key}.") for p in problems}
    kw = {k: v for k, v in kwargs.items() if k not in reported}
    if "lr" in kw and not (finite_number(kw["lr"]) and kw["lr"] > 0):
        problems.append(f"{key}.lr: must be a number > 0, got {describe(kw['lr'])}")
    if "weight_decay" in kw and not (finite_number(kw["weight_decay"]) and kw["weight_decay"] >= 0):
        problems.append(f"{key}.weight_decay: must be a number >= 0, got {describe(kw['weight_decay'])}")
    if "momentum" in kw and not (finite_number(kw["momentum"]) and 0 <= kw["momentum"] < 1):
        problems.append(f"{key}.momentum: must be a number in [0, 1), got {describe(kw['momentum'])}")
    betas = kw.get("betas")
    if betas is not None and not (
        isinstance(betas, list) and len(betas) == 2 and all(finite_number(b) and 0 <= b < 1 for b in betas)
    ):
        problems.append(f"{key}.betas: expected two numbers in [0, 1), e.g. [0.9, 0.999]; got {describe(betas)}")
    return problems


def _trial_step(spec: Component, groups: list[Any], step: bool) -> list[str]:
    """Optimizers check their own arguments when built, some only when they step (SparseAdam refuses dense
    gradients there): one parameter per group (and one for the default group) is enough to let them, before any
    model."""
    import torch

    params = [torch.nn.Parameter(torch.zeros(1)) for _ in range(len(groups) + 1)]
    settings = [{k: v for k, v in g.items() if k != "params"} for g in groups]
    torch_groups = [{"params": [p], **own} for p, own in zip(params, [*settings, {}], strict=True)]
    try:
        optimizer = components.instantiate("optimizer", spec, torch_groups)
    except RecipeError as e:
        return e.problems
    if not step:
        return []
    for param in params:
        param.grad = torch.ones(1)
    try:
        optimizer.step()
    except Exception as e:
        message = str(e).splitlines()[0] if str(e) else ""
        return [
            f"optimizer: a step on a dense gradient (as the built-in models give) failed: {type(e).__name__}: {message}"
        ]
    return []


# ---------------------------------------------------------------------------------------------------- scheduler


def check_scheduler(spec: Component) -> list[str]:
    name = spec.short_name
    if name is None:
        return check_component("scheduler", "scheduler", spec, passed=("optimizer",)) or _number_problems(
            "scheduler", dict(spec.kwargs)
        )
    if name not in schedules.SCHEDULES:
        return check_component("scheduler", "scheduler", spec)
    problems = check_component(
        "scheduler", "scheduler", spec, passed=("step", "total_steps"), extra=schedules.WARMUP_KEYS
    )
    kwargs = dict(spec.kwargs)
    warmup = kwargs.pop("warmup_steps", 0)
    problem = components.integer_problem(warmup, 0)
    if problem:
        problems.append(f"scheduler.warmup_steps: {problem}")
    elif warmup and name in schedules.OWN_WARMUP:
        problems.append(f"scheduler.warmup_steps: {name} shapes its own start; remove warmup_steps")
    if "warmup_start" in kwargs:
        problems.extend(_warmup_start_problems(name, kwargs.pop("warmup_start")))
    reported = {p.split(":", 1)[0] for p in problems}
    for key, value in kwargs.items():
        if f"scheduler.{key}" not in reported and isinstance(value, (int, float)) and not isinstance(value, bool):
            problems.extend(_schedule_value_problems(key, value))
    if name == "step" and "step_size" not in kwargs:
        problems.append("scheduler.step_size: missing required value (steps between decays)")
    if name == "cyclic" and "step_size_up" not in kwargs:
        problems.append("scheduler.step_size_up: missing required value (steps from low to high)")
    return problems


def _warmup_start_problems(name: str, start: Any) -> list[str]:
    if start not in schedules.WARMUP_STARTS:
        return [f"scheduler.warmup_start: expected one of: {', '.join(schedules.WARMUP_STARTS)}, got {describe(start)}"]
    if name in schedules.OWN_WARMUP:
        return [f"scheduler.warmup_start: {name} shapes its own start; remove warmup_start"]
    return []


def _schedule_value_problems(key: str, value: float) -> list[str]:
    """A built-in schedule's numeric argument, whose type already fits."""
    if key in ("step_size", "step_size_up", "step_size_down"):
        problem = components.integer_problem(value, 1)
        return [f"scheduler.{key}: {problem}"] if problem else []
    if not finite_number(value):
        return [f"scheduler.{key}: expected a finite number, got {describe(value)}"]
    if key in ("gamma", "base_ratio", "min_ratio", "pct_start") and not 0 <= value <= 1:
        return [f"scheduler.{key}: must be in [0, 1], got {value!r}"]
    if key in ("div_factor", "final_div_factor") and not value > 0:
        return [f"scheduler.{key}: must be > 0, got {value!r}"]  # the schedule divides by it
    return []
