"""Turning `_component_` specs into objects, and the short names of the built-in ones.

A component is named by a short built-in name (`mlp`, `adamw`, `cosine`) or by a dotted path to any importable
class or function (`torch.optim.SGD`, `mymodels.TinyNet`). Its other keys are keyword arguments.
"""

from __future__ import annotations

import collections.abc
import copy
import difflib
import importlib
import inspect
import math
import os
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

# Built-in short names, per recipe section. Values are dotted paths so that nothing heavy is imported until used.
MODELS = {
    "mlp": "launcher.models.mlp.MLP",
    "gpt": "launcher.models.gpt.GPT",
    "hf_causal_lm": "launcher.models.hf.causal_lm",
    "hf_classifier": "launcher.models.hf.classifier",
}
DATASETS = {
    "synthetic_classification": "launcher.data.synthetic.SyntheticClassification",
    "char_text": "launcher.data.text.CharText",
    "token_memmap": "launcher.data.memmap.TokenMemmap",
    "hf_text": "launcher.data.hf.HFText",
    "hf_classification": "launcher.data.hf.HFClassification",
    "hf_chat": "launcher.data.chat.HFChat",
}
# The built-in names of what trains on token sequences: a language model's evaluation gives its perplexity.
SEQUENCE_DATASETS = {"char_text", "token_memmap", "hf_text", "hf_chat"}
LANGUAGE_MODELS = {"gpt", "hf_causal_lm"}
LOSSES = {
    "cross_entropy": "torch.nn.CrossEntropyLoss",
    "mse": "torch.nn.MSELoss",
    "l1": "torch.nn.L1Loss",
    "bce_with_logits": "torch.nn.BCEWithLogitsLoss",
}
# Arguments of built-in datasets that name files which must exist before training starts.
DATASET_PATH_ARGS = {"char_text": ("path",), "token_memmap": ("path",)}

INT64_MAX = 2**63 - 1  # torch takes sizes, counts and steps as C int64: larger integers fail deep inside it
SEED_LIMIT = 2**32  # numpy seeds its generator with 32-bit integers (accelerate's set_seed seeds numpy too)


def _optimizers() -> dict[str, str]:
    import torch.optim

    names = {}
    for name, obj in vars(torch.optim).items():
        if inspect.isclass(obj) and issubclass(obj, torch.optim.Optimizer) and obj is not torch.optim.Optimizer:
            names[name.lower()] = f"torch.optim.{name}"
    return names


def registry(section: str) -> dict[str, str]:
    """The short names a recipe section accepts, mapped to what they stand for."""
    if section == "model":
        return MODELS
    if section == "data":
        return DATASETS
    if section == "loss":
        return LOSSES
    if section == "optimizer":
        return _optimizers()
    if section == "scheduler":
        from launcher.schedules import SCHEDULES

        return {name: f"launcher.schedules.{fn.__name__}" for name, fn in SCHEDULES.items()}
    raise KeyError(section)


@dataclass(frozen=True)
class Component:
    """A `_component_` spec: what to build and the keyword arguments the recipe gives it."""

    target: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    @property
    def short_name(self) -> str | None:
        """The built-in name this spec uses, lower-cased, or None for a dotted path."""
        return None if "." in self.target else self.target.lower()

    def to_dict(self) -> dict[str, Any]:
        return {"_component_": self.target, **copy.deepcopy(dict(self.kwargs))}


class ResolveError(Exception):
    pass


class ArgumentProblem(ValueError):
    """What a component says of one of its arguments it cannot work with (a path with no model in it, a column the
    data lacks): reported as the recipe key `<section>.<arg>: <message>`, or under `key` as given."""

    def __init__(self, arg: str, message: str, key: str | None = None):
        self.arg, self.message, self.key = arg, message, key
        super().__init__(message)


def import_object(path: str) -> Any:
    """Import `a.b.C` (or `a.b.C.method`): the longest importable module prefix, then attributes."""
    parts = path.split(".")
    if not all(parts):
        raise ResolveError(f"'{path}' is not a dotted path")
    last_error: Exception | None = None
    for cut in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:cut])
        try:
            obj: Any = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            # Only a missing module of our own prefix means "try a shorter prefix"; anything the module itself
            # failed to import is the user's real problem and is reported as it is.
            if e.name is not None and not module_name.startswith(e.name) and e.name != module_name:
                raise ResolveError(f"importing '{module_name}' failed: {e}") from e
            last_error = e
            continue
        except Exception as e:  # a user module that raises on import
            raise ResolveError(f"importing '{module_name}' failed: {type(e).__name__}: {e}") from e
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                raise ResolveError(f"'{module_name}' has no attribute '{'.'.join(parts[cut:])}'")
            obj = getattr(obj, attr)
        return obj
    raise ResolveError(f"no module named '{parts[0]}' ({last_error})")


def optional(module: str, extra: str) -> Any:
    """A package of one of the launcher's extras, or one line saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ArgumentProblem(
            "_component_",
            f"needs the package '{module}', which is not installed: pip install -e '.[{extra}]' "
            f"(or pip install 'launcher[{extra}]')",
        ) from None


def resolve(section: str, target: str) -> Callable[..., Any]:
    """The class or function a spec names, or ResolveError with the valid short names."""
    names = registry(section)
    if "." not in target:
        if target.lower() in names:
            return import_object(names[target.lower()])
        hint = difflib.get_close_matches(target.lower(), list(names), n=1)
        did_you_mean = f" (did you mean '{hint[0]}'?)" if hint else ""
        raise ResolveError(
            f"unknown name '{target}'{did_you_mean}; expected one of: {', '.join(sorted(names))}, "
            "or a dotted path such as mypackage.module.Name"
        )
    obj = import_object(target)
    if not callable(obj):
        raise ResolveError(f"'{target}' is not a class or function")
    return obj


def argument_problems(
    fn: Callable[..., Any], kwargs: Mapping[str, Any], passed: tuple[str, ...] = (), extra: tuple[str, ...] = ()
) -> list[tuple[str, str]]:
    """(argument, problem) pairs for keyword arguments `fn` does not take, or whose value does not fit a simple
    type hint of `fn` (int, float, str, bool, a Literal, lists of those, optionals). `passed` are arguments the
    launcher gives itself; `extra` are keys the launcher takes out of `kwargs` before calling."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return []
    hints = _type_hints(fn)
    open_ended = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    accepted = [n for n, p in params.items() if p.kind is not inspect.Parameter.VAR_POSITIONAL and n not in passed]
    accepted += [e for e in extra if e not in accepted]
    problems = []
    for key, value in kwargs.items():
        if key in extra:
            continue
        if key not in accepted:
            if not open_ended:
                hint = difflib.get_close_matches(key, accepted, n=1)
                did_you_mean = f"did you mean '{hint[0]}'? " if hint else ""
                problems.append(
                    (key, f"not an argument of {_name(fn)} ({did_you_mean}it takes: {', '.join(accepted)})")
                )
            continue
        expected = mismatch(value, hints.get(key))
        if expected:
            problems.append((key, f"expected {expected}, got {describe(value)}"))
    return problems


def _type_hints(fn: Callable[..., Any]) -> dict[str, Any]:
    target = fn.__init__ if inspect.isclass(fn) else fn
    try:
        return typing.get_type_hints(target)
    except Exception:  # hints that do not resolve (forward references, optional imports) are simply not checked
        return {}


_SIMPLE = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def mismatch(value: Any, hint: Any) -> str | None:
    """What `hint` expects, when `value` does not fit it; None when it fits or the hint is not a simple one."""
    if hint is None or hint is Any:
        return None
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if value is None and len(inner) < len(args):
            return None
        wants = [mismatch(value, a) for a in inner]
        if any(w is None for w in wants):
            return None
        return " or ".join(w for w in wants if w)
    if origin is typing.Literal:
        return None if value in args else "one of: " + ", ".join(map(str, args))
    if origin in (list, tuple, collections.abc.Sequence) and args:
        if not isinstance(value, (list, tuple)):
            return "a list"
        item = args[0]
        if any(mismatch(v, item) for v in value):
            return f"a list of {_SIMPLE.get(item, 'values').removeprefix('an ').removeprefix('a ')}s"
        return None
    if hint in _SIMPLE:
        ok = {
            bool: isinstance(value, bool),
            int: isinstance(value, int) and not isinstance(value, bool),
            float: isinstance(value, (int, float)) and not isinstance(value, bool),
            str: isinstance(value, str),
        }[hint]
        return None if ok else _SIMPLE[hint]
    return None


def describe(value: Any) -> str:
    """A value as the user wrote it in YAML, with what kind of value it is."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, (int, float)):
        return f"a number ({value})"
    if isinstance(value, str):
        return f"a string ({value!r})"
    kind = "a list" if isinstance(value, (list, tuple)) else "a section" if isinstance(value, Mapping) else ""
    if not kind:
        return type(value).__name__
    text = yaml.safe_dump(value, default_flow_style=True, width=1_000_000).strip()
    return f"{kind} ({text})" if len(text) <= 60 else kind


def accepts(fn: Callable[..., Any], name: str) -> bool:
    """Whether `fn` takes a keyword argument `name`."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def instantiate(section: str, spec: Component, *args: Any, key: str | None = None, **defaults: Any) -> Any:
    """Build the object: `target(*args, **defaults | spec.kwargs)`; the recipe's own values win over defaults.

    A component that fails to build is the recipe's problem as far as the user can tell: it comes back as one
    RecipeError line naming the recipe key (`key`, default `section`) and the exception. LAUNCHER_FULL_ERROR=1
    shows the traceback instead, for debugging one's own component.
    """
    from launcher.errors import RecipeError

    fn = resolve(section, spec.target)
    kwargs = {k: v for k, v in defaults.items() if accepts(fn, k)}
    kwargs.update(copy.deepcopy(dict(spec.kwargs)))
    try:
        return fn(*args, **kwargs)
    except ArgumentProblem as e:
        raise RecipeError(f"{e.key or f'{key or section}.{e.arg}'}: {e.message}") from None
    except Exception as e:
        failed = _run_failed(e)
        if failed is not None:  # a build lock never released (its library re-raised it wrapped): not the recipe's fault
            raise failed from None
        if os.environ.get("LAUNCHER_FULL_ERROR") == "1":
            raise
        message = str(e).splitlines()[0] if str(e) else ""
        raise RecipeError(
            f"{key or section}: building {_name(fn)} failed: {type(e).__name__}: {message} "
            "(LAUNCHER_FULL_ERROR=1 shows the traceback)"
        ) from None


def _run_failed(e: BaseException | None) -> Any:
    """The RunFailed `e` is, or was raised from (DeepSpeed wraps what its op loader raised in a RuntimeError)."""
    from launcher.errors import RunFailed

    seen = 0
    while e is not None and seen < 10:
        if isinstance(e, RunFailed):
            return e
        e, seen = e.__cause__ or e.__context__, seen + 1
    return None


def _name(fn: Callable[..., Any]) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


# ---------------------------------------------------------------------------------------------------- value checks
# Pure checks the built-in components' `check_args` share: each says what is wrong with a value, or None.


def finite_number(value: Any) -> bool:
    """A number that is finite as a float: an integer too large for a float is not (float() would overflow)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _bound(n: int) -> str:
    return {INT64_MAX: "2**63-1", SEED_LIMIT - 1: "2**32-1"}.get(n, str(n))


def integer_problem(value: Any, low: int, high: int = INT64_MAX) -> str | None:
    if not isinstance(value, int) or isinstance(value, bool):
        return f"expected an integer, got {describe(value)}"
    if value < low:
        return f"must be >= {low}, got {value}"
    if value > high:
        return f"must be <= {_bound(high)}, got {value}"
    return None


def number_problem(value: Any) -> str | None:
    return None if finite_number(value) else f"expected a finite number, got {describe(value)}"


def fraction_problem(value: Any, zero: bool = True) -> str | None:
    """A number in [0, 1) (or (0, 1) without `zero`)."""
    if not finite_number(value):
        return f"expected a number in {'[' if zero else '('}0, 1), got {describe(value)}"
    if not (0 <= value < 1 if zero else 0 < value < 1):
        return f"must be in {'[' if zero else '('}0, 1), got {value}"
    return None


def effective_args(fn: Callable[..., Any], kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword arguments `fn` would run with: `kwargs` over its defaults (required ones left out unless given)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return dict(kwargs)
    defaults = {n: p.default for n, p in params.items() if p.default is not inspect.Parameter.empty}
    return {**defaults, **kwargs}


def is_built_in(fn: Callable[..., Any]) -> bool:
    """Whether `fn` is one of the launcher's own components, which carry a pure `check_args`."""
    return str(getattr(fn, "__module__", "")).startswith("launcher.") and hasattr(fn, "check_args")
