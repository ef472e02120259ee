"""What `launcher validate` (and `launcher train`, before it writes anything) checks of the data splits: their
arguments and files, what opening them tells, and whether the train set has a batch for every process."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from launcher import components, guards
from launcher.components import Component
from launcher.data import DataFacts
from launcher.errors import RecipeError
from launcher.recipe.component_checks import check_component, too_big

if TYPE_CHECKING:
    from launcher.recipe.schema import Recipe


def check_split(
    key: str, spec: Component, check_files: bool, this_machine: bool, stage: str = "open"
) -> tuple[list[str], DataFacts | None]:
    """Problems with one data split, and what is known of it (None: nothing without opening it). `stage`: "args"
    checks only what needs the set not opened, its arguments and (with `check_files`) the local files they name;
    "open" opens it as cheaply as it can be (a tokenized set, one with `peek`, is read from its files' start only);
    "build" builds it as training will (a tokenized set into the cache that then serves the run)."""
    problems = check_component(key, "data", spec, check_files=check_files)
    if problems:
        return problems, None
    fn = components.resolve("data", spec.target)
    if not components.is_built_in(fn):
        return [], None  # the user's dataset: built by training only, which may be costly or download things
    args = components.effective_args(fn, spec.kwargs)
    problems = [f"{key}.{arg}: {msg}" for arg, msg in fn.check_args(args)]
    if check_files and not problems and hasattr(fn, "missing_files"):
        problems = [f"{key}.{arg}: {msg}" for arg, msg in fn.missing_files(args)]
    if problems or stage == "args":
        return problems, None
    if hasattr(fn, "facts"):
        facts = fn.facts(args)
        return too_big(key, "the set's tensors", facts.tensor_bytes, this_machine), facts
    if not check_files:
        return [], None
    if hasattr(fn, "peek") and stage == "open":
        try:  # the same lines as building would give for a missing file, column or tokenizer, in milliseconds
            return [], fn.peek(args)
        except components.ArgumentProblem as e:
            return [f"{e.key or f'{key}.{e.arg}'}: {e.message}"], None
    try:  # a file-backed set, cheap to open: opened as training will, so what it refuses is refused here alike
        dataset = components.instantiate("data", spec, key=key)
    except RecipeError as e:
        return e.problems, None
    model_kwargs = dict(getattr(dataset, "model_kwargs", {}))
    if not hasattr(dataset, "__len__"):  # a stream: what it tells the model is known, its length is not
        return [], DataFacts(model_kwargs=model_kwargs, samples=None)
    return [], DataFacts(model_kwargs=model_kwargs, samples=len(dataset))


def new_val_problems(train: Component, val: Component, found: list[str], val_found: list[str]) -> list[str]:
    """The val split's problems but those the train split has already said, word for word: a val set with the
    train set's component and arguments (its `split` aside) reads the same file, whose column or tokenizer is
    missing once, not once per split."""

    def but_split(spec: Component) -> dict[str, Any]:
        return {k: v for k, v in spec.kwargs.items() if k != "split"}

    if train.target != val.target or but_split(train) != but_split(val):
        return val_found
    return [p for p in val_found if "data.train" + p.removeprefix("data.val") not in found]


def check_batches(recipe: Recipe, samples: int, processes: int) -> list[str]:
    """With drop_last, a train set smaller than one global batch gives epochs without a batch: the run would
    never take a step, nor end."""
    t = recipe.train
    if not recipe.data.drop_last or samples >= t.batch_size * processes:
        return []
    per = f"{t.batch_size} x {processes} processes" if processes > 1 else str(t.batch_size)
    return [
        f"data.drop_last: the train set's {samples} samples make no whole batch of train.batch_size {per}, so an "
        "epoch would have no step; set data.drop_last=false or a smaller train.batch_size"
    ]


def launched_processes() -> int:
    """The world size this process was launched into (1 when not launched, or when the variable is garbled)."""
    try:
        return max(guards.launched_world(os.environ), 1)
    except ValueError:
        return 1
