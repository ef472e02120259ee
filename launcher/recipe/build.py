"""Typed building: the merged raw mapping becomes a frozen `Recipe`, with every type problem found on the way
recorded as one `key.path: message` line instead of stopping at the first.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from launcher import components
from launcher.components import Component, describe
from launcher.recipe.dialect import deep_merge
from launcher.recipe.schema import MISSING, DataConfig, Recipe, SlurmConfig

# Keys a section accepts besides its fields: `data.dataset` is folded into `data.train` and `data.val` first.
_EXTRA_KEYS: dict[type, tuple[str, ...]] = {DataConfig: ("dataset",)}
# Lists that one string is not taken for (elsewhere `trackers: jsonl` is a list of one): each item is one line of
# the job script, and a lone string there is most often a slip (`slurm.sbatch=--qos` for `slurm.sbatch=[--qos=high]`).
_LISTS_ONLY: dict[type, dict[str, str]] = {SlurmConfig: {"sbatch": "sbatch options", "setup": "shell lines"}}


@dataclass(frozen=True)
class Built:
    """What typed building made of a raw recipe, and what later checks need to know of it."""

    recipe: Recipe | None  # None: a required section could not be built
    bad_keys: list[str]  # keys with a type problem: their values stand at their defaults in `recipe`
    origin: dict[str, str]  # keys inherited from data.dataset: `data.train.path` -> `data.dataset.path`
    # The splits built on data.dataset, and the keys their own sections give: a problem with an argument given by
    # neither (a default) is reported under data.dataset too, where the user would set it.
    own_keys: dict[str, frozenset[str]] = dataclasses.field(default_factory=dict)

    def about_bad_keys(self, problem: str) -> bool:
        """Whether `problem` is under a key that already has a problem, or names one (a dotted one: a top-level
        section's name is also a word of prose) in its reasoning ("give train.max_steps or train.max_epochs")."""
        key, _, message = problem.partition(":")
        named = [b for b in self.bad_keys if "." in b and re.search(rf"(?<![\w.]){re.escape(b)}(?!\w)", message)]
        return bool(named) or any(key == bad or key.startswith(bad + ".") for bad in self.bad_keys)

    def relocate(self, problems: list[str]) -> list[str]:
        """Problems renamed to the keys the user wrote, each reported once."""
        out: list[str] = []
        for problem in problems:
            for inherited, written in self.origin.items():
                problem = re.sub(re.escape(inherited) + r"(?![\w])", written, problem)
            problem = re.sub(r"(?<![\w.])(data\.(?:train|val))\.(\w+)(?![\w])", self._to_shared, problem)
            if problem not in out:
                out.append(problem)
        return out

    def _to_shared(self, match: re.Match[str]) -> str:
        split, arg = match.group(1), match.group(2)
        own = self.own_keys.get(split)
        return match.group(0) if own is None or arg in own else f"data.dataset.{arg}"


def build_recipe(raw: Mapping[str, Any], source: str, default_name: str, problems: list[str]) -> Built:
    """The typed recipe built from `raw` (its `name` and `run_dir` defaulted), with each type problem appended to
    `problems` as `source: key.path: message`."""
    raw = dict(raw)
    raw.pop("base", None)
    origin: dict[str, str] = {}
    own_keys: dict[str, frozenset[str]] = {}
    data_problems: list[str] = []
    if isinstance(raw.get("data"), dict):
        raw["data"], origin, data_problems, own_keys = _merge_splits(raw["data"])
        problems.extend(f"{source}: {p}" for p in data_problems)
    checker = _Checker(source, problems)
    if data_problems:  # a bad data.dataset already explains why data.train is missing
        checker.bad_keys.append("data.train")
    recipe = checker.build(Recipe, raw, "")
    if recipe is not None:
        if not recipe.name:
            recipe = dataclasses.replace(recipe, name=default_name)
        if not recipe.run_dir:
            recipe = dataclasses.replace(recipe, run_dir=str(Path("runs") / recipe.name))
    return Built(recipe, checker.bad_keys, origin, own_keys)


def _merge_splits(
    data: dict[str, Any],
) -> tuple[dict[str, Any], dict[str, str], list[str], dict[str, frozenset[str]]]:
    """Fold `data.dataset` into `data.train` and `data.val` (which default to `split: train|val` when a shared
    dataset is given, so a one-file dataset needs no repetition).

    Also returns where each inherited key came from (`data.train.path` -> `data.dataset.path`), so a problem is
    reported under the key the user wrote, the problems with `data.dataset` itself, and the keys each split that
    inherits gives itself.
    """
    data = dict(data)
    shared = data.pop("dataset", None)
    origin: dict[str, str] = {}
    own_keys: dict[str, frozenset[str]] = {}
    if shared is None:
        return data, origin, [], own_keys
    if isinstance(shared, str):
        shared = {"_component_": shared}
    if not isinstance(shared, dict):
        problem = f"data.dataset: expected a _component_ section or a name, got {describe(shared)}"
        return data, origin, [problem], own_keys
    for split in ("train", "val"):
        if split in data and data[split] is None:
            continue  # `val: null` turns validation off
        own = data.get(split, {"split": split})
        if isinstance(own, str):
            own = {"_component_": own}
        if not isinstance(own, dict):
            continue  # left for the checker to report
        # A split naming another component does not inherit the shared one's arguments.
        replaced = "_component_" in own and own["_component_"] != shared.get("_component_")
        data[split] = copy.deepcopy(own) if replaced else deep_merge(shared, own)
        if not replaced:
            own_keys[f"data.{split}"] = frozenset(own)
        for key in shared:
            if key not in own and not replaced:
                origin[f"data.{split}.{key}"] = f"data.dataset.{key}"
    return data, origin, [], own_keys


class _Checker:
    """Builds frozen dataclasses from raw mappings, recording every type problem instead of stopping at the first.

    A field whose value is wrong is built with its default (and its key kept in `bad_keys`), so the rest of the
    recipe can still be checked; a required field that is wrong leaves its section unbuilt.
    """

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        self.bad_keys: list[str] = []

    def problem(self, key: str, message: str) -> None:
        self.problems.append(f"{self.source}: {key}: {message}")
        self.bad_keys.append(key)

    def build(self, cls: type, raw: Any, prefix: str) -> Any:
        if not isinstance(raw, Mapping):
            self.problem(
                prefix.rstrip(".") or "(top level)", f"expected a section (a mapping of keys), got {describe(raw)}"
            )
            return None
        fields = {f.name: f for f in dataclasses.fields(cls)}
        raw = self.named_keys(raw, prefix)
        self.unknown_keys(raw, [*fields, *_EXTRA_KEYS.get(cls, ())], prefix)
        hints = typing.get_type_hints(cls)
        values = {}
        ok = True
        for name, f in fields.items():
            key = f"{prefix}{name}"
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            lists_only = _LISTS_ONLY.get(cls, {})
            if name in lists_only and isinstance(raw.get(name), str):
                self.problem(key, f"expected a list of {lists_only[name]}, one per item; got {describe(raw[name])}")
            elif name in raw and not _unset_section(raw[name], hints[name]):
                value = self.convert(raw[name], hints[name], key)
                if value is not _BAD:
                    values[name] = value
                elif required:
                    ok = False
            elif required:
                if key not in self.bad_keys:
                    given_null = " (null leaves a section unset)" if name in raw else ""
                    self.problem(key, f"missing required value{given_null}")
                ok = False
        return cls(**values) if ok else None

    def named_keys(self, raw: Mapping[Any, Any], prefix: str) -> dict[str, Any]:
        """`raw` without the keys that are not strings, each recorded as a problem: a section's keys and a
        component's arguments are names (YAML reads `7:` or `null:` as a number or null)."""
        for key in raw:
            if not isinstance(key, str):
                self.problems.append(
                    f"{self.source}: {prefix}{_key_text(key)}: a key must be a name (a string), got {describe(key)}"
                )
        return {k: v for k, v in raw.items() if isinstance(k, str)}

    def unknown_keys(self, raw: Mapping[str, Any], known: list[str], prefix: str) -> None:
        for key in raw:
            if key not in known:
                hint = difflib.get_close_matches(str(key), known, n=1)
                did_you_mean = f"did you mean '{hint[0]}'? " if hint else ""
                where = prefix.rstrip(".") or "a recipe"
                self.problem(f"{prefix}{key}", f"unknown key ({did_you_mean}{where} takes: {', '.join(known)})")

    def convert(self, value: Any, tp: Any, key: str) -> Any:
        if isinstance(value, str) and value == MISSING:
            self.problem(key, f"missing required value (give it on the command line: {key}=...)")
            return _BAD
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if origin in (typing.Union, types.UnionType):
            if value is None and type(None) in args:
                return None
            inner = [a for a in args if a is not type(None)]
            if len(inner) > 1:
                return self.one_of_forms(value, inner, key)
            return self.convert(value, inner[0], key)
        if origin is Literal:
            return self.literal(value, args, key)
        if origin is tuple:
            return self.names(value, key) if args[0] is str else self.integers(value, key)
        if origin is dict:
            return self.mapping(value, args[1], key)
        if tp is Component:
            return self.component(value, key)
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, Mapping) and hasattr(tp, "shorthand"):
                return self.shorthand(value, tp, key)
            built = self.build(tp, value, key + ".")
            return _BAD if built is None else built
        return self.scalar(value, tp, key)

    def shorthand(self, value: Any, tp: Any, key: str) -> Any:
        """A section given as one word (`train.compile: true`, `train.activation_checkpointing: full`)."""
        mapped = tp.shorthand(value)
        if mapped is None:
            words = {"CompileConfig": "true, false or a mapping", "Recompute": "none, full or {every: k}"}
            self.problem(key, f"expected {words.get(tp.__name__, 'a section')}, got {describe(value)}")
            return _BAD
        return self.build(tp, mapped, key + ".")

    def literal(self, value: Any, choices: tuple[Any, ...], key: str) -> Any:
        if value in choices:
            return value
        hint = difflib.get_close_matches(str(value), [str(a) for a in choices], n=1)
        did_you_mean = f" (did you mean '{hint[0]}'?)" if hint else ""
        self.problem(key, f"expected one of: {', '.join(map(str, choices))}; got {describe(value)}{did_you_mean}")
        return _BAD

    def names(self, value: Any, key: str) -> Any:
        """A list of names; one name alone is a list of one."""
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            self.problem(key, f"expected a list of names, got {describe(value)}")
            return _BAD
        return tuple(value)

    def mapping(self, value: Any, tp: Any, key: str) -> Any:
        """A mapping of names to values of type `tp` (`strategy.tp.plan`)."""
        if not isinstance(value, Mapping):
            self.problem(key, f"expected a mapping of names to values, got {describe(value)}")
            return _BAD
        items = {str(k): self.convert(v, tp, f"{key}.{k}") for k, v in value.items()}
        return _BAD if any(v is _BAD for v in items.values()) else items

    def integers(self, value: Any, key: str) -> Any:
        """A list of integers."""
        if not isinstance(value, list):
            self.problem(key, f"expected a list of integers, got {describe(value)}")
            return _BAD
        items = [self.scalar(v, int, key) for v in value]
        return _BAD if any(v is _BAD for v in items) else tuple(items)

    def one_of_forms(self, value: Any, forms: list[Any], key: str) -> Any:
        """A value given in one of a few forms (`profile.ranks`: a list of integers, or `all`): the first it fits."""
        for form in forms:
            if components.mismatch(value, form) is None:
                return self.convert(value, form, key)
        wanted = " or ".join(_wanted(form) for form in forms)
        self.problem(key, f"expected {wanted}, got {describe(value)}")
        return _BAD

    def scalar(self, value: Any, tp: Any, key: str) -> Any:
        expected = components.mismatch(value, tp)
        if not expected and tp is int and not -components.INT64_MAX - 1 <= value <= components.INT64_MAX:
            expected = "an integer that fits 64 bits (at most 2**63-1)"
        if not expected and tp is float and isinstance(value, int) and not components.finite_number(value):
            expected = "a number within a float's range"
        if expected:
            self.problem(key, f"expected {expected}, got {describe(value)}")
            return _BAD
        return float(value) if tp is float else value

    def component(self, value: Any, key: str) -> Any:
        if isinstance(value, str):
            return Component(value)
        if not isinstance(value, Mapping):
            self.problem(key, f"expected a _component_ section or a name, got {describe(value)}")
            return _BAD
        kwargs = {k: v for k, v in self.named_keys(value, key + ".").items() if k != "_component_"}
        misspelt = [k for k in kwargs if _looks_like_component_key(k, "_component_" in value)]
        for k in misspelt:
            self.problem(f"{key}.{k}", "unknown key (did you mean '_component_'?)")
            del kwargs[k]
        if not self.component_target(value, key, misspelt):
            return _BAD
        ok = True  # misspelt keys are left out: the rest of the component can still be checked
        for k, v in kwargs.items():
            if isinstance(v, str) and v == MISSING:
                self.problem(f"{key}.{k}", f"missing required value (give it on the command line: {key}.{k}=...)")
                ok = False
        return Component(value["_component_"], types.MappingProxyType(copy.deepcopy(kwargs))) if ok else _BAD

    def component_target(self, value: Mapping[str, Any], key: str, misspelt: list[str]) -> bool:
        """Whether the section's `_component_` is given, and a name; a problem recorded if not."""
        target = value.get("_component_")
        if "_component_" not in value:
            if not misspelt:  # the misspelt key is the same problem
                self.problem(f"{key}._component_", "missing required value (a short name or a dotted path)")
            return False
        if not isinstance(target, str) or not target.strip():
            what = "an empty string" if isinstance(target, str) else describe(target)
            self.problem(f"{key}._component_", f"expected a string (a short name or a dotted path), got {what}")
            return False
        return True


def _unset_section(value: Any, tp: Any) -> bool:
    """`strategy: null`: a section (or component) given null is not set, as if left out: its defaults apply, or,
    for a required one, it is missing. A file can so drop a section it inherits (`~key` does on the command line);
    where null is a value of its own (`early_stopping: null`, `data.val: null`: off), the type says so."""
    return value is None and (tp is Component or dataclasses.is_dataclass(tp))


def _key_text(key: Any) -> str:
    """A key as written in YAML: `null`, `true`, `7`."""
    if key is None or isinstance(key, bool):
        return "null" if key is None else str(key).lower()
    return str(key)


def _wanted(form: Any) -> str:
    """What a form of a value takes, in words: `a list of integers`, `all`."""
    if typing.get_origin(form) is Literal:
        return " or ".join(map(str, typing.get_args(form)))
    return components.mismatch([None], form) or components.mismatch(None, form) or str(form)


def _looks_like_component_key(key: str, present: bool) -> bool:
    """`_componnt_`, `_component`, Hydra's `_target_`; without any `_component_`, also `component`, `compnent`."""
    if key == "_target_":
        return True
    if present and not (key.startswith("_") or key.endswith("_")):
        return False  # an argument that happens to look like the word
    return bool(difflib.get_close_matches(key, ["_component_"], n=1, cutoff=0.8))


_BAD = object()
