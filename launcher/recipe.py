"""Recipes: YAML loading, `base:` composition, `a.b=c` overrides, the typed schema and its validation.

A recipe is read once, here. Everything after `load_recipe` sees a frozen `Recipe` of plain values; every problem
found on the way is collected and raised together as one `RecipeError`, one line per problem.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import importlib.util
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

from launcher import components, schedules, strategies
from launcher.components import Component, describe
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
    max_nonfinite_steps: int = 3  # consecutive skipped updates (non-finite loss or gradient) before the run stops
    max_time_s: float | None = None  # wall-time budget: stop, on every rank at the same step, once it is spent


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
    keep_best: int = 0  # also keep this many step checkpoints with the best `monitor`
    async_save: bool = False  # write in a background thread: training waits for a copy in memory, not the disk
    monitor: str = "val/loss"
    mode: Literal["min", "max"] = "min"
    dir: str | None = None


@dataclass(frozen=True)
class LoggingConfig:
    every_steps: int = 10
    trackers: tuple[str, ...] = ("tensorboard", "jsonl")
    progress_bar: bool = True


@dataclass(frozen=True)
class FSDPConfig:
    """FSDP2 (`fully_shard`): parameters, gradients and optimizer state sharded across processes."""

    wrap: tuple[str, ...] = ()  # module classes sharded as units of their own (e.g. Block); the root always is one
    reshard_after_forward: bool = True  # free gathered parameters after forward (less memory, one more all-gather)
    activation_checkpointing: bool = False  # recompute each `wrap` unit's activations in backward
    cpu_offload: bool = False  # keep sharded parameters, gradients and optimizer state in host memory


@dataclass(frozen=True)
class DeepSpeedConfig:
    zero_stage: Literal[1, 2, 3] = 2
    offload_optimizer: bool = False  # optimizer state and step on the CPU (ZeRO-Offload)
    offload_params: bool = False  # parameters in host memory between uses (ZeRO-3 only)
    config: str | None = None  # a DeepSpeed JSON file merged into the config generated from the recipe


@dataclass(frozen=True)
class StrategyConfig:
    name: Literal["ddp", "fsdp", "deepspeed"] = "ddp"
    find_unused_parameters: bool = False  # ddp
    timeout_s: float = 1800.0  # how long a collective waits for a peer before the run gives up on it
    fsdp: FSDPConfig = FSDPConfig()
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()

    @property
    def sharded(self) -> bool:
        """Whether every process holds only its shard of the training state (and writes it in checkpoints)."""
        return self.name != "ddp"


@dataclass(frozen=True)
class SlurmConfig:
    """Defaults for `launcher slurm submit` (its flags win)."""

    nodes: int = 1
    gpus_per_node: int = 0
    time: str = "01:00:00"
    partition: str | None = None
    account: str | None = None
    max_requeues: int = 3  # times a job stopped by SLURM's warning or the stop file requeues itself
    signal_before_s: int = 120  # SLURM warns the job (SIGUSR1) this long before its end
    stop_before_end_s: int = 0  # stop and save this long before the job's end even without a signal (0: off)
    sbatch: tuple[str, ...] = ()  # further sbatch options, e.g. ["--qos=high", "--constraint=h100"]
    setup: tuple[str, ...] = ()  # shell lines run first in the job: module load ..., source .venv/bin/activate


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
    slurm: SlurmConfig = SlurmConfig()

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir) if self.checkpoint.dir else Path(self.run_dir) / "checkpoints"

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML-ready values: what `--print-recipe` prints and the run dir keeps."""
        return _plain(self)


TRACKERS = ("jsonl", "tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive")
BUILT_IN_TRACKERS = ("jsonl", "tensorboard")  # the others are their own packages, installed by the user

# ---------------------------------------------------------------------------------------------------- loading


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's scalars, as users expect them: `1e-3` is a number, `no`/`on`/`yes`
    are strings (`mixed_precision: no`), only true/false are booleans; and a key given twice is an error."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen and key != "<<":
                raise yaml.constructor.ConstructorError(
                    f"while reading a section (line {node.start_mark.line + 1})",
                    node.start_mark,
                    f"the key '{key}' is given twice (first on line {seen[key].start_mark.line + 1}); "
                    "duplicate keys are not allowed",
                    key_node.start_mark,
                )
            seen[key] = key_node
        return super().construct_mapping(node, deep=deep)


_BOOL_TAG, _FLOAT_TAG = "tag:yaml.org,2002:bool", "tag:yaml.org,2002:float"
_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in (_BOOL_TAG, _FLOAT_TAG)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(_BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_Loader.add_implicit_resolver(
    _FLOAT_TAG,
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


def load_recipe(path: str | Path, overrides: Sequence[str] = (), check_files: bool = True) -> Recipe:
    """Read, compose, override and validate a recipe, or raise RecipeError listing every problem.

    The recipe's folder becomes importable, as a script's folder is, so `_component_: mymodels.Net` finds a
    `mymodels.py` kept beside the recipe. Without `check_files`, data files need not exist yet (`launcher plan`).
    """
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: no such recipe file")
    raw = compose(path)
    raw, override_problems = apply_overrides(raw, overrides, source=str(path))
    recipe_dir = str(path.resolve().parent)
    if recipe_dir not in sys.path:
        sys.path.insert(0, recipe_dir)
    return validate(raw, str(path), path.stem, override_problems, check_files)


def read_yaml_file(path: Path) -> dict[str, Any]:
    try:
        data = parse_yaml(path.read_text())
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: {_yaml_problem(e)}") from None
    except UnicodeDecodeError:
        raise RecipeError(f"{path}: not a text file") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: expected a mapping of sections (model:, data:, ...), got {describe(data)}")
    return data


def _yaml_problem(e: yaml.YAMLError) -> str:
    """The parser's complaint on one line: where it gave up, what it expected, and where the construct began."""
    mark = getattr(e, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    context, context_mark = getattr(e, "context", None), getattr(e, "context_mark", None)
    began = ""
    if context and context_mark and (not mark or context_mark.line != mark.line):
        began = f"; {context.removeprefix('while ')} that began on line {context_mark.line + 1}"
    return f"{where}not valid YAML ({problem}{began})"


def compose(path: Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The recipe with its `base:` chain deep-merged under it; a base path is relative to the file naming it."""
    resolved = path.resolve()
    data = read_yaml_file(path)
    base = data.pop("base", None)
    if base is None:
        return data
    bases = [base] if isinstance(base, str) else base
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise RecipeError(f"{path}: base: expected a recipe path or a list of them, got {describe(base)}")
    merged: dict[str, Any] = {}
    for b in bases:
        base_path = path.parent / b
        if not base_path.is_file():
            raise RecipeError(f"{path}: base: no such recipe file: {base_path}")
        if base_path.resolve() in (*_seen, resolved):
            chain = " -> ".join(str(p) for p in (*_seen, resolved, base_path.resolve()))
            raise RecipeError(f"{path}: base: recipes inherit from each other in a loop ({chain})")
        merged = deep_merge(merged, compose(base_path, (*_seen, resolved)))
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


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str], source: str) -> tuple[dict[str, Any], list[str]]:
    """Apply `a.b=c` overrides; the value is read as YAML (`3e-4`, `true`, `null`, `[64, 64]`). Returns the new
    mapping and the problems with overrides that could not be applied, so they are reported with the rest."""
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
            problems.append(f"{source}: {key}: the override value {text!r} is not valid YAML")
            continue
        node = out
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                where = ".".join(parts[: i + 1])
                problems.append(f"{source}: {where}: is {describe(child)}, not a section (override '{item}')")
                break
            node = child
        else:
            node[parts[-1]] = value
    return out, problems


# ---------------------------------------------------------------------------------------------------- validation

# Keys a section accepts besides its fields: `data.dataset` is folded into `data.train` and `data.val` first.
_EXTRA_KEYS: dict[type, tuple[str, ...]] = {DataConfig: ("dataset",)}


def validate(
    raw: Mapping[str, Any],
    source: str,
    default_name: str = "run",
    problems: Sequence[str] = (),
    check_files: bool = True,
) -> Recipe:
    """The typed, frozen recipe, or RecipeError with every problem found (and `problems` found before), one
    line each."""
    found: list[str] = list(problems)
    raw = dict(raw)
    raw.pop("base", None)
    origin: dict[str, str] = {}
    data_problems: list[str] = []
    if isinstance(raw.get("data"), dict):
        raw["data"], origin, data_problems = _merge_splits(raw["data"])
        found.extend(f"{source}: {p}" for p in data_problems)
    checker = _Checker(source, found)
    if data_problems:  # a bad data.dataset already explains why data.train is missing
        checker.bad_keys.append("data.train")
    recipe = checker.build(Recipe, raw, "")
    if recipe is not None:
        if not recipe.name:
            recipe = dataclasses.replace(recipe, name=default_name)
        if not recipe.run_dir:
            recipe = dataclasses.replace(recipe, run_dir=str(Path("runs") / recipe.name))
        # Values that failed their type check stand at their defaults here: their range checks would only repeat
        # or mislead, so problems under those keys are left out.
        for problem in check_values(recipe, check_files):
            key = problem.split(":", 1)[0]
            if not any(key == bad or key.startswith(bad + ".") for bad in checker.bad_keys):
                found.append(f"{source}: {problem}")
    if found:
        raise RecipeError(_relocate(found, origin))
    assert recipe is not None
    return recipe


def _merge_splits(data: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str], list[str]]:
    """Fold `data.dataset` into `data.train` and `data.val` (which default to `split: train|val` when a shared
    dataset is given, so a one-file dataset needs no repetition).

    Also returns where each inherited key came from (`data.train.path` -> `data.dataset.path`), so a problem is
    reported under the key the user wrote, and the problems with `data.dataset` itself.
    """
    data = dict(data)
    shared = data.pop("dataset", None)
    origin: dict[str, str] = {}
    if shared is None:
        return data, origin, []
    if isinstance(shared, str):
        shared = {"_component_": shared}
    if not isinstance(shared, dict):
        return data, origin, [f"data.dataset: expected a _component_ section or a name, got {describe(shared)}"]
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
        for key in shared:
            if key not in own and not replaced:
                origin[f"data.{split}.{key}"] = f"data.dataset.{key}"
    return data, origin, []


def _relocate(problems: list[str], origin: dict[str, str]) -> list[str]:
    """Problems renamed to the keys the user wrote, each reported once."""
    out: list[str] = []
    for problem in problems:
        for inherited, written in origin.items():
            problem = re.sub(re.escape(inherited) + r"(?![\w])", written, problem)
        if problem not in out:
            out.append(problem)
    return out


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
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        known = [*fields, *_EXTRA_KEYS.get(cls, ())]
        for key in raw:
            if key not in known:
                hint = difflib.get_close_matches(str(key), known, n=1)
                did_you_mean = f"did you mean '{hint[0]}'? " if hint else ""
                where = prefix.rstrip(".") or "a recipe"
                self.problem(f"{prefix}{key}", f"unknown key ({did_you_mean}{where} takes: {', '.join(known)})")
        values = {}
        ok = True
        for name, f in fields.items():
            key = f"{prefix}{name}"
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            if name in raw:
                value = self.convert(raw[name], hints[name], key)
                if value is not _BAD:
                    values[name] = value
                elif required:
                    ok = False
            elif required:
                if key not in self.bad_keys:
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
            self.problem(key, f"expected one of: {', '.join(map(str, args))}; got {describe(value)}{did_you_mean}")
            return _BAD
        if origin is tuple:
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                self.problem(key, f"expected a list of names, got {describe(value)}")
                return _BAD
            return tuple(value)
        if tp is Component:
            return self.component(value, key)
        if dataclasses.is_dataclass(tp):
            built = self.build(tp, value, key + ".")
            return _BAD if built is None else built
        expected = components._mismatch(value, tp)
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
        target = value.get("_component_")
        if not isinstance(target, str) or not target:
            self.problem(f"{key}._component_", "missing required value (a short name or a dotted path)")
            return _BAD
        kwargs = {k: v for k, v in value.items() if k != "_component_"}
        ok = True
        for k, v in kwargs.items():
            if isinstance(v, str) and v == MISSING:
                self.problem(f"{key}.{k}", f"missing required value (give it on the command line: {key}.{k}=...)")
                ok = False
        return Component(target, types.MappingProxyType(copy.deepcopy(kwargs))) if ok else _BAD


_BAD = object()


def check_values(recipe: Recipe, check_files: bool = True) -> list[str]:
    """Problems a type cannot express: ranges, combinations, components that do not import, missing files.
    Each is `key.path: message`."""
    problems: list[str] = []

    def need(ok: bool, key: str, message: str) -> None:
        if not ok:
            problems.append(f"{key}: {message}")

    def at_least(key: str, value: int | None, low: int) -> None:
        need(value is None or value >= low, key, f"must be >= {low}, got {value}")

    t = recipe.train
    need(t.max_steps is not None or t.max_epochs is not None, "train", "give train.max_steps or train.max_epochs")
    at_least("train.max_steps", t.max_steps, 1)
    at_least("train.max_epochs", t.max_epochs, 1)
    at_least("train.batch_size", t.batch_size, 1)
    at_least("train.gradient_accumulation_steps", t.gradient_accumulation_steps, 1)
    at_least("train.seed", t.seed, 0)
    at_least("train.max_nonfinite_steps", t.max_nonfinite_steps, 1)
    need(t.max_time_s is None or t.max_time_s > 0, "train.max_time_s", f"must be > 0, got {t.max_time_s}")
    problems.extend(_check_strategy(recipe))
    need(
        t.clip_grad_norm is None or t.clip_grad_norm > 0,
        "train.clip_grad_norm",
        f"must be > 0, or null for no clipping; got {t.clip_grad_norm}",
    )

    d = recipe.data
    at_least("data.num_workers", d.num_workers, 0)
    problems.extend(_check_component("data.train", "data", d.train, check_files=check_files))
    if d.val is not None:
        problems.extend(_check_component("data.val", "data", d.val, check_files=check_files))
    problems.extend(_check_component("model", "model", recipe.model))
    problems.extend(_check_component("loss", "loss", recipe.loss))
    problems.extend(_check_optimizer(recipe.optimizer))
    problems.extend(_check_scheduler(recipe.scheduler))

    e = recipe.eval
    at_least("eval.every_steps", e.every_steps, 1)
    at_least("eval.max_batches", e.max_batches, 1)
    at_least("eval.batch_size", e.batch_size, 1)
    evaluates = d.val is not None and (e.every_steps is not None or e.every_epoch)

    es = recipe.early_stopping
    if es is not None:
        at_least("early_stopping.patience", es.patience, 0)
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
    at_least("checkpoint.keep_last", c.keep_last, 1)
    at_least("checkpoint.every_steps", c.every_steps, 1)
    at_least("checkpoint.keep_best", c.keep_best, 0)
    if c.keep_best:
        need(c.monitor.startswith("val/"), "checkpoint.monitor", f"expected a validation metric, got {c.monitor!r}")
        need(evaluates, "checkpoint.keep_best", "needs evaluation: set data.val and eval.every_steps or every_epoch")

    lg = recipe.logging
    at_least("logging.every_steps", lg.every_steps, 1)
    for name in lg.trackers:
        need(name in TRACKERS, "logging.trackers", f"unknown tracker {name!r}; expected some of: {', '.join(TRACKERS)}")
        if check_files and name in TRACKERS and name not in BUILT_IN_TRACKERS:
            need(
                importlib.util.find_spec(name) is not None,
                "logging.trackers",
                f"{name} is not installed here (pip install {name.replace('_', '-')}), or leave it out of the list",
            )

    resume = recipe.resume
    by_name = Path(resume).name in ("latest", "best") and Path(resume).parent.is_dir()
    need(
        resume in ("none", "auto") or Path(resume).is_dir() or by_name,
        "resume",
        f"expected none, auto, a checkpoint directory or <checkpoints>/latest|best; {resume!r} is not a directory",
    )
    return problems


def _check_strategy(recipe: Recipe) -> list[str]:
    s, t = recipe.strategy, recipe.train
    problems = []
    if s.timeout_s <= 0:
        problems.append(f"strategy.timeout_s: must be > 0, got {s.timeout_s}")
    for section, default in (("fsdp", FSDPConfig()), ("deepspeed", DeepSpeedConfig())):
        if s.name != section and getattr(s, section) != default:
            problems.append(f"strategy.{section}: set, but strategy.name is {s.name}; set strategy.name={section}")
    if s.sharded and recipe.checkpoint.async_save:
        problems.append(
            f"checkpoint.async_save: not available with strategy.name={s.name} (every process writes its shard, "
            "together); set it to false"
        )
    if s.name == "fsdp" and t.mixed_precision == "fp16":
        problems.append("train.mixed_precision: fp16 is not supported with strategy.name=fsdp; use bf16")
    if s.name == "deepspeed":
        ds = s.deepspeed
        if ds.offload_params and ds.zero_stage != 3:
            problems.append(f"strategy.deepspeed.offload_params: needs zero_stage 3, got {ds.zero_stage}")
        if importlib.util.find_spec("deepspeed") is None:
            problems.append("strategy.name: deepspeed needs the deepspeed package: pip install 'launcher[deepspeed]'")
        if ds.config is not None:
            user, problem = strategies.read_user_config(ds.config)
            if problem:
                problems.append(f"strategy.deepspeed.config: {problem}")
            else:
                found = strategies.user_config_problems(recipe, user or {})
                problems.extend(f"strategy.deepspeed.config: {ds.config} {p}" for p in found)
    return problems


def _check_component(
    key: str,
    section: str,
    spec: Component,
    passed: tuple[str, ...] = (),
    extra: tuple[str, ...] = (),
    check_files: bool = True,
) -> list[str]:
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
                    problems.append(f"{key}.{arg}: file not found: {file} (relative paths start at {Path.cwd()})")
    return problems


def _check_optimizer(spec: Component) -> list[str]:
    problems = _check_component("optimizer", "optimizer", spec, passed=("params",))
    if problems:
        return problems
    kw = spec.kwargs
    if "lr" in kw and not (_number(kw["lr"]) and kw["lr"] > 0):
        problems.append(f"optimizer.lr: must be a number > 0, got {describe(kw['lr'])}")
    if "weight_decay" in kw and not (_number(kw["weight_decay"]) and kw["weight_decay"] >= 0):
        problems.append(f"optimizer.weight_decay: must be a number >= 0, got {describe(kw['weight_decay'])}")
    if "momentum" in kw and not (_number(kw["momentum"]) and 0 <= kw["momentum"] < 1):
        problems.append(f"optimizer.momentum: must be a number in [0, 1), got {describe(kw['momentum'])}")
    betas = kw.get("betas")
    if betas is not None and not (
        isinstance(betas, list) and len(betas) == 2 and all(_number(b) and 0 <= b < 1 for b in betas)
    ):
        problems.append(f"optimizer.betas: expected two numbers in [0, 1), e.g. [0.9, 0.999]; got {describe(betas)}")
    if problems:
        return problems
    # Optimizers check their own arguments when built; one parameter is enough to let them, before any model.
    try:
        import torch

        components.instantiate("optimizer", spec, [torch.nn.Parameter(torch.zeros(1))])
    except RecipeError as e:
        problems.extend(e.problems)
    return problems


def _check_scheduler(spec: Component) -> list[str]:
    name = spec.short_name
    if name is None:
        return _check_component("scheduler", "scheduler", spec, passed=("optimizer",))
    if name not in schedules.SCHEDULES:
        return _check_component("scheduler", "scheduler", spec)
    problems = _check_component("scheduler", "scheduler", spec, passed=("step", "total_steps"), extra=("warmup_steps",))
    kwargs = dict(spec.kwargs)
    warmup = kwargs.pop("warmup_steps", 0)
    if not (isinstance(warmup, int) and not isinstance(warmup, bool) and warmup >= 0):
        problems.append(f"scheduler.warmup_steps: must be an integer >= 0, got {describe(warmup)}")
    elif warmup and name in schedules.OWN_WARMUP:
        problems.append(f"scheduler.warmup_steps: {name} shapes its own start; remove warmup_steps")
    for key, value in kwargs.items():
        if not _number(value):
            continue  # reported above, by type
        if key in ("step_size", "step_size_up", "step_size_down") and not (isinstance(value, int) and value >= 1):
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
