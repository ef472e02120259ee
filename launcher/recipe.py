"""Recipes: YAML loading, `base:` composition, `a.b=c` overrides, the typed schema and its validation.

A recipe is read once, here. Everything after `load_recipe` sees a frozen `Recipe` of plain values; every problem
found on the way is collected and raised together as one `RecipeError`, one line per problem.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import re
import sys
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from launcher import components, schedules
from launcher.components import Component
from launcher.errors import RecipeError

MISSING = "???"  # a value the user must give, on the command line or in a recipe that inherits this one

# ---------------------------------------------------------------------------------------------------- the schema


@dataclass(frozen=True)
class DataConfig:
    """`dataset` holds arguments shared by both splits; `train` and `val` are merged on top of it."""

    train: Component
    val: Component | None = None
    num_workers: int = 0
    shuffle: bool = True
    drop_last: bool = False


@dataclass(frozen=True)
class TrainConfig:
    max_steps: int | None = None
    max_epochs: int | None = None
    batch_size: int = 32
    gradient_accumulation_steps: int = 1
    clip_grad_norm: float | None = 1.0
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    seed: int = 0


@dataclass(frozen=True)
class EvalConfig:
    every_steps: int | None = None
    every_epoch: bool = True
    max_batches: int | None = None
    batch_size: int | None = None


@dataclass(frozen=True)
class EarlyStoppingConfig:
    monitor: str = "val/loss"
    mode: Literal["min", "max"] = "min"
    patience: int = 5
    min_delta: float = 0.0


@dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int | None = None
    save_final: bool = True
    keep_last: int = 3
    keep_best: bool = False
    monitor: str = "val/loss"
    mode: Literal["min", "max"] = "min"
    dir: str | None = None


@dataclass(frozen=True)
class LoggingConfig:
    every_steps: int = 10
    trackers: tuple[str, ...] = ("tensorboard", "jsonl")
    progress_bar: bool = True


@dataclass(frozen=True)
class StrategyConfig:
    name: Literal["ddp"] = "ddp"
    find_unused_parameters: bool = False


@dataclass(frozen=True, kw_only=True)
class Recipe:
    name: str = ""
    run_dir: str = ""
    resume: str = "none"
    model: Component
    data: DataConfig
    loss: Component = Component("cross_entropy")
    optimizer: Component
    scheduler: Component = Component("constant")
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    early_stopping: EarlyStoppingConfig | None = None
    checkpoint: CheckpointConfig = CheckpointConfig()
    logging: LoggingConfig = LoggingConfig()
    strategy: StrategyConfig = StrategyConfig()

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir) if self.checkpoint.dir else Path(self.run_dir) / "checkpoints"

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML-ready values: what `--print-recipe` prints and the run dir keeps."""
        return _plain(self)


TRACKERS = ("jsonl", "tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive")

# ---------------------------------------------------------------------------------------------------- loading


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, reading `1e-3` as a float the way YAML 1.2 (and every user) does."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """Read, compose, override and validate a recipe, or raise RecipeError listing every problem.

    The recipe's folder becomes importable, as a script's folder is, so `_component_: mymodels.Net` finds a
    `mymodels.py` kept beside the recipe.
    """
    path = Path(path)
    raw = compose(path)
    raw = apply_overrides(raw, overrides, source=str(path))
    recipe_dir = str(path.resolve().parent)
    if recipe_dir not in sys.path:
        sys.path.insert(0, recipe_dir)
    return validate(raw, source=str(path), default_name=path.stem)


def read_yaml_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise RecipeError(f"{path}: no such recipe file")
    try:
        data = parse_yaml(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise RecipeError(f"{path}: {where}not valid YAML ({problem})") from None
    except UnicodeDecodeError:
        raise RecipeError(f"{path}: not a text file") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: expected a mapping of sections (model:, data:, ...), got {_kind(data)}")
    return data


def compose(path: Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The recipe with its `base:` chain deep-merged under it; a base path is relative to the file naming it."""
    resolved = path.resolve()
    if resolved in _seen:
        chain = " -> ".join(str(p) for p in (*_seen, resolved))
        raise RecipeError(f"{path}: base: recipes inherit from each other in a loop ({chain})")
    data = read_yaml_file(path)
    base = data.pop("base", None)
    if base is None:
        return data
    bases = [base] if isinstance(base, str) else base
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise RecipeError(f"{path}: base: expected a recipe path or a list of them, got {_kind(base)}")
    merged: dict[str, Any] = {}
    for b in bases:
        merged = deep_merge(merged, compose(path.parent / b, (*_seen, resolved)))
    return deep_merge(merged, data)


def deep_merge(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """`top` over `base`, mappings merged key by key; a component whose `_component_` changes is replaced whole,
    since the old arguments belong to another class."""
    out = copy.deepcopy(dict(base))
    for key, value in top.items():
        old = out.get(key)
        if isinstance(old, dict) and isinstance(value, dict):
            if "_component_" in value and value["_component_"] != old.get("_component_"):
                out[key] = copy.deepcopy(value)
            else:
                out[key] = deep_merge(old, value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str], source: str) -> dict[str, Any]:
    """Apply `a.b=c` overrides; the value is read as YAML (`3e-4`, `true`, `null`, `[64, 64]`)."""
    out = copy.deepcopy(raw)
    problems = []
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            problems.append(f"{source}: override '{item}': expected key.path=value, e.g. optimizer.lr=1e-3")
            continue
        try:
            value = parse_yaml(text) if text else None
        except yaml.YAMLError:
            problems.append(f"{source}: override '{item}': the value is not valid YAML")
            continue
        node = out
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                where = ".".join(parts[: i + 1])
                problems.append(f"{source}: override '{item}': {where} is {_kind(child)}, not a section")
                break
            node = child
        else:
            node[parts[-1]] = value
    if problems:
        raise RecipeError(problems)
    return out


# ---------------------------------------------------------------------------------------------------- validation


def validate(raw: Mapping[str, Any], source: str, default_name: str = "run") -> Recipe:
    """The typed, frozen recipe, or RecipeError with every problem found, one line each."""
    problems: list[str] = []
    raw = dict(raw)
    raw.pop("base", None)
    origin: dict[str, str] = {}
    if isinstance(raw.get("data"), dict):
        raw["data"], origin = _merge_splits(raw["data"])
    checker = _Checker(source, problems)
    recipe = checker.build(Recipe, raw, "")
    if recipe is not None:
        if not recipe.name:
            recipe = dataclasses.replace(recipe, name=default_name)
        if not recipe.run_dir:
            recipe = dataclasses.replace(recipe, run_dir=str(Path("runs") / recipe.name))
        problems.extend(f"{source}: {p}" for p in check_values(recipe))
    if problems:
        raise RecipeError(_relocate(problems, source, origin))
    assert recipe is not None
    return recipe


def _merge_splits(data: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """Fold `data.dataset` into `data.train` and `data.val` (which default to `split: train|val` when a shared
    dataset is given, so a one-file dataset needs no repetition).

    Also returns where each inherited key came from (`data.train.path` -> `data.dataset.path`), so a problem is
    reported under the key the user wrote.
    """
    data = dict(data)
    shared = data.pop("dataset", None)
    origin: dict[str, str] = {}
    if not isinstance(shared, dict):
        if shared is not None:
            data["dataset"] = shared  # left for the checker to report
        return data, origin
    for split in ("train", "val"):
        if split in data and data[split] is None:
            continue  # `val: null` turns validation off
        own = data.get(split, {"split": split})
        if not isinstance(own, dict):
            continue  # left for the checker to report
        data[split] = deep_merge(shared, own)
        replaced = "_component_" in own and own["_component_"] != shared.get("_component_")
        for key in shared:
            if key not in own and not replaced:
                origin[f"data.{split}.{key}"] = f"data.dataset.{key}"
    return data, origin


def _relocate(problems: list[str], source: str, origin: dict[str, str]) -> list[str]:
    """Problems renamed to the keys the user wrote, each reported once."""
    out: list[str] = []
    for problem in problems:
        for inherited, written in origin.items():
            problem = re.sub(re.escape(inherited) + r"(?![\w])", written, problem)
        if problem not in out:
            out.append(problem)
    return out


class _Checker:
    """Builds frozen dataclasses from raw mappings, recording type problems instead of stopping at the first."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems

    def problem(self, key: str, message: str) -> None:
        self.problems.append(f"{self.source}: {key}: {message}")

    def build(self, cls: type, raw: Any, prefix: str) -> Any:
        if not isinstance(raw, Mapping):
            self.problem(prefix.rstrip(".") or "(top level)", f"expected a section (a mapping), got {_kind(raw)}")
            return None
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for key in raw:
            if key not in fields:
                hint = difflib.get_close_matches(str(key), list(fields), n=1)
                did_you_mean = f"did you mean '{hint[0]}'? " if hint else ""
                self.problem(
                    f"{prefix}{key}", f"unknown key ({did_you_mean}{_section(prefix)} takes: {', '.join(fields)})"
                )
        values = {}
        ok = True
        for name, f in fields.items():
            key = f"{prefix}{name}"
            if name in raw:
                value = self.convert(raw[name], hints[name], key)
                if value is _BAD:
                    ok = False
                    continue
                values[name] = value
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                self.problem(key, "missing required value")
                ok = False
        return cls(**values) if ok else None

    def convert(self, value: Any, tp: Any, key: str) -> Any:
        if isinstance(value, str) and value == MISSING:
            self.problem(key, f"missing required value (give it on the command line: {key}=...)")
            return _BAD
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if origin in (typing.Union, types.UnionType):
            if value is None and type(None) in args:
                return None
            inner = [a for a in args if a is not type(None)]
            return self.convert(value, inner[0], key)
        if origin is Literal:
            if value in args:
                return value
            hint = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            did_you_mean = f" (did you mean '{hint[0]}'?)" if hint else ""
            self.problem(key, f"expected one of: {', '.join(map(str, args))}; got {value!r}{did_you_mean}")
            return _BAD
        if origin is tuple:
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                self.problem(key, f"expected a list of names, got {_kind(value)}")
                return _BAD
            return tuple(value)
        if tp is Component:
            return self.component(value, key)
        if dataclasses.is_dataclass(tp):
            built = self.build(tp, value, key + ".")
            return _BAD if built is None else built
        if tp is bool:
            if isinstance(value, bool):
                return value
            self.problem(key, f"expected true or false, got {value!r}")
            return _BAD
        if tp is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            self.problem(key, f"expected an integer, got {_kind(value)}")
            return _BAD
        if tp is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
            self.problem(key, f"expected a number, got {_kind(value)}")
            return _BAD
        if tp is str:
            if isinstance(value, str):
                return value
            self.problem(key, f"expected a string, got {_kind(value)}")
            return _BAD
        raise TypeError(f"schema type {tp} is not handled")  # a bug in the schema, not in the recipe

    def component(self, value: Any, key: str) -> Any:
        if isinstance(value, str):
            return Component(value)
        if not isinstance(value, Mapping):
            self.problem(key, f"expected a _component_ section or a name, got {_kind(value)}")
            return _BAD
        target = value.get("_component_")
        if not isinstance(target, str) or not target:
            self.problem(f"{key}._component_", "missing required value (a short name or a dotted path)")
            return _BAD
        kwargs = {k: v for k, v in value.items() if k != "_component_"}
        for k, v in kwargs.items():
            if isinstance(v, str) and v == MISSING:
                self.problem(f"{key}.{k}", f"missing required value (give it on the command line: {key}.{k}=...)")
                return _BAD
        return Component(target, types.MappingProxyType(copy.deepcopy(kwargs)))


_BAD = object()


def check_values(recipe: Recipe) -> list[str]:
    """Problems a type cannot express: ranges, combinations, components that do not import, missing files."""
    problems: list[str] = []

    def need(ok: bool, key: str, message: str) -> None:
        if not ok:
            problems.append(f"{key}: {message}")

    t = recipe.train
    need(t.max_steps is not None or t.max_epochs is not None, "train", "give train.max_steps or train.max_epochs")
    need(t.max_steps is None or t.max_steps >= 1, "train.max_steps", f"must be >= 1, got {t.max_steps}")
    need(t.max_epochs is None or t.max_epochs >= 1, "train.max_epochs", f"must be >= 1, got {t.max_epochs}")
    need(t.batch_size >= 1, "train.batch_size", f"must be >= 1, got {t.batch_size}")
    need(
        t.gradient_accumulation_steps >= 1,
        "train.gradient_accumulation_steps",
        f"must be >= 1, got {t.gradient_accumulation_steps}",
    )
    need(
        t.clip_grad_norm is None or t.clip_grad_norm > 0,
        "train.clip_grad_norm",
        f"must be > 0, or null for no clipping; got {t.clip_grad_norm}",
    )
    need(t.seed >= 0, "train.seed", f"must be >= 0, got {t.seed}")

    d = recipe.data
    need(d.num_workers >= 0, "data.num_workers", f"must be >= 0, got {d.num_workers}")
    problems.extend(_check_component("data.train", "data", d.train))
    if d.val is not None:
        problems.extend(_check_component("data.val", "data", d.val))
    problems.extend(_check_component("model", "model", recipe.model))
    problems.extend(_check_component("loss", "loss", recipe.loss))
    problems.extend(_check_component("optimizer", "optimizer", recipe.optimizer, passed=("params",)))
    problems.extend(_check_optimizer_values(recipe.optimizer))
    problems.extend(_check_scheduler(recipe.scheduler))

    e = recipe.eval
    need(e.every_steps is None or e.every_steps >= 1, "eval.every_steps", f"must be >= 1, got {e.every_steps}")
    need(e.max_batches is None or e.max_batches >= 1, "eval.max_batches", f"must be >= 1, got {e.max_batches}")
    need(e.batch_size is None or e.batch_size >= 1, "eval.batch_size", f"must be >= 1, got {e.batch_size}")
    evaluates = d.val is not None and (e.every_steps is not None or e.every_epoch)

    es = recipe.early_stopping
    if es is not None:
        need(es.patience >= 0, "early_stopping.patience", f"must be >= 0, got {es.patience}")
        need(es.min_delta >= 0, "early_stopping.min_delta", f"must be >= 0, got {es.min_delta}")
        need(
            es.monitor.startswith("val/"),
            "early_stopping.monitor",
            f"expected a validation metric such as val/loss or val/accuracy, got {es.monitor!r}",
        )
        need(
            evaluates,
            "early_stopping",
            "needs evaluation: set data.val and eval.every_steps or eval.every_epoch, or early_stopping=null",
        )

    c = recipe.checkpoint
    need(c.keep_last >= 1, "checkpoint.keep_last", f"must be >= 1, got {c.keep_last}")
    need(c.every_steps is None or c.every_steps >= 1, "checkpoint.every_steps", f"must be >= 1, got {c.every_steps}")
    if c.keep_best:
        need(c.monitor.startswith("val/"), "checkpoint.monitor", f"expected a validation metric, got {c.monitor!r}")
        need(evaluates, "checkpoint.keep_best", "needs evaluation: set data.val and eval.every_steps or every_epoch")

    lg = recipe.logging
    need(lg.every_steps >= 1, "logging.every_steps", f"must be >= 1, got {lg.every_steps}")
    for name in lg.trackers:
        need(name in TRACKERS, "logging.trackers", f"unknown tracker {name!r}; expected some of: {', '.join(TRACKERS)}")

    resume = recipe.resume
    need(
        resume in ("none", "auto") or Path(resume).is_dir(),
        "resume",
        f"expected none, auto or a checkpoint directory; {resume!r} is not a directory",
    )
    return problems


def _check_component(key: str, section: str, spec: Component, passed: tuple[str, ...] = ()) -> list[str]:
    try:
        fn = components.resolve(section, spec.target)
    except components.ResolveError as e:
        return [f"{key}._component_: {e}"]
    problems = [f"{key}: {p}" for p in components.unknown_kwargs(fn, spec.kwargs, passed)]
    if section == "data" and spec.short_name in components.DATASET_PATH_ARGS:
        for arg in components.DATASET_PATH_ARGS[spec.short_name]:
            value = spec.kwargs.get(arg)
            if value is None:
                problems.append(f"{key}.{arg}: missing required value (a file path)")
            elif not isinstance(value, str):
                problems.append(f"{key}.{arg}: expected a file path, got {_kind(value)}")
            else:
                split = spec.kwargs.get("split", "train")
                file = Path(value.replace("{split}", str(split)))
                if not file.is_file():
                    problems.append(f"{key}.{arg}: file not found: {file} (relative paths start at {Path.cwd()})")
    return problems


def _check_optimizer_values(spec: Component) -> list[str]:
    problems = []
    lr = spec.kwargs.get("lr")
    if lr is not None and not _positive(lr):
        problems.append(f"optimizer.lr: must be a number > 0, got {lr!r}")
    wd = spec.kwargs.get("weight_decay")
    if wd is not None and not (_number(wd) and wd >= 0):
        problems.append(f"optimizer.weight_decay: must be a number >= 0, got {wd!r}")
    momentum = spec.kwargs.get("momentum")
    if momentum is not None and not (_number(momentum) and 0 <= momentum < 1):
        problems.append(f"optimizer.momentum: must be a number in [0, 1), got {momentum!r}")
    return problems


def _check_scheduler(spec: Component) -> list[str]:
    name = spec.short_name
    if name is None:
        return _check_component("scheduler", "scheduler", spec, passed=("optimizer",))
    if name not in schedules.SCHEDULES:
        return _check_component("scheduler", "scheduler", spec)
    kwargs = dict(spec.kwargs)
    warmup = kwargs.pop("warmup_steps", 0)
    problems = [
        f"scheduler: {p}" for p in components.unknown_kwargs(schedules.SCHEDULES[name], kwargs, ("step", "total_steps"))
    ]
    if not (isinstance(warmup, int) and not isinstance(warmup, bool) and warmup >= 0):
        problems.append(f"scheduler.warmup_steps: must be an integer >= 0, got {warmup!r}")
    elif warmup and name in schedules.OWN_WARMUP:
        problems.append(f"scheduler.warmup_steps: {name} shapes its own start; remove warmup_steps")
    for key, value in kwargs.items():
        if not _number(value):
            problems.append(f"scheduler.{key}: expected a number, got {_kind(value)}")
        elif key in ("step_size", "step_size_up", "step_size_down") and not (isinstance(value, int) and value >= 1):
            problems.append(f"scheduler.{key}: must be an integer >= 1, got {value!r}")
        elif key in ("gamma", "base_ratio", "min_ratio", "pct_start") and not 0 <= value <= 1:
            problems.append(f"scheduler.{key}: must be in [0, 1], got {value!r}")
    if name == "step" and "step_size" not in kwargs:
        problems.append("scheduler.step_size: missing required value (steps between decays)")
    if name == "cyclic" and "step_size_up" not in kwargs:
        problems.append("scheduler.step_size_up: missing required value (steps from low to high)")
    return problems


# ---------------------------------------------------------------------------------------------------- helpers


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _positive(v: Any) -> bool:
    return _number(v) and v > 0


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, (int, float)):
        return f"a number ({value})"
    if isinstance(value, str):
        return f"a string ({value!r})"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a section"
    return type(value).__name__


def _section(prefix: str) -> str:
    return prefix.rstrip(".") or "a recipe"


def _plain(value: Any) -> Any:
    if isinstance(value, Component):
        return value.to_dict()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def dump(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)
