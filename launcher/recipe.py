"""Recipes: YAML loading, `base:` composition, `a.b=c` overrides, the typed schema and its validation.

A recipe is read once, here. Everything after `load_recipe` sees a frozen `Recipe` of plain values; every problem
found on the way is collected and raised together as one `RecipeError`, one line per problem.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import importlib.util
import re
import sys
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from launcher import component_checks, components, strategies
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


def load_recipe(
    path: str | Path, overrides: Sequence[str] = (), check_files: bool = True, this_machine: bool = True
) -> Recipe:
    """Read, compose, override and validate a recipe, or raise RecipeError listing every problem.

    The recipe's folder becomes importable, as a script's folder is, so `_component_: mymodels.Net` finds a
    `mymodels.py` kept beside the recipe. Without `check_files`, data files need not exist yet (`launcher plan`).
    Without `this_machine`, nothing is checked against this machine (its GPU, its memory): the recipe is for
    another one (`launcher slurm submit` on a login node, `launcher plan`).
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
    return validate(raw, str(path), path.stem, [*base_problems, *override_problems], check_files, this_machine)


def base_override(overrides: Sequence[str], source: str) -> tuple[list[str] | None, list[str], list[str]]:
    """Take `base=...` (and `~base`) out of the overrides: it replaces the recipe's base chain, so it is applied
    before composing, wherever it stands. Returns the bases (None: the recipe's own), the other overrides, and
    problems with the base overrides."""
    bases: list[str] | None = None
    rest, problems = [], []
    for item in overrides:
        key, sep, text = item.partition("=")
        if item == "~base":
            bases = []
        elif key == "base" and sep:
            try:
                value = parse_yaml(text) if text else None
            except yaml.YAMLError:
                value = {}  # refused below, as any value that is not a path
            if value is not None and not _is_path_list(value):
                problems.append(f"{source}: base: expected a recipe path or a list of them, got {describe(value)}")
            else:
                bases = [] if value is None else [value] if isinstance(value, str) else value
        elif key.startswith(("base.", "~base.")):
            problems.append(f"{source}: base: is a recipe path, not a section (override '{item}')")
        else:
            rest.append(item)
    return bases, rest, problems


def _is_path_list(value: Any) -> bool:
    return isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))


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


def compose(path: Path, _seen: tuple[Path, ...] = (), bases: list[str] | None = None) -> dict[str, Any]:
    """The recipe with its `base:` chain deep-merged under it; a base path is relative to the file naming it.
    `bases` replaces the file's own `base:` (an override on the command line, relative to the file too)."""
    resolved = path.resolve()
    data = read_yaml_file(path)
    base = data.pop("base", None)
    if bases is not None:
        base = bases
    if base is None:
        return data
    if not _is_path_list(base):
        raise RecipeError(f"{path}: base: expected a recipe path or a list of them, got {describe(base)}")
    merged: dict[str, Any] = {}
    for b in [base] if isinstance(base, str) else base:
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
    """Apply `a.b=c` overrides, and `~a.b` (remove a.b, as if never written), in order; the value is read as YAML
    (`3e-4`, `true`, `null`, `[64, 64]`). Returns the new mapping and the problems with overrides that could not
    be applied, so they are reported with the rest."""
    out = copy.deepcopy(raw)
    problems = []
    for item in overrides:
        problem = _remove(out, item) if item.startswith("~") else _set(out, item)
        if problem:
            problems.append(f"{source}: {problem}")
    return out, problems


def _set(out: dict[str, Any], item: str) -> str | None:
    key, sep, text = item.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        return f"override '{item}': expected key.path=value (or ~key.path to remove it), e.g. optimizer.lr=1e-3"
    try:
        value = parse_yaml(text) if text else None
    except yaml.YAMLError:
        return f"{key}: the override value {text!r} is not valid YAML"
    node = out
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            return f"{'.'.join(parts[: i + 1])}: is {describe(child)}, not a section (override '{item}')"
        node = child
    node[parts[-1]] = value
    return None


def _remove(out: dict[str, Any], item: str) -> str | None:
    key = item[1:]
    if "=" in key or not key or any(not part for part in key.split(".")):
        return f"override '{item}': expected ~key.path, which removes the key, e.g. ~early_stopping"
    node: Any = out
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.get(part) if isinstance(node, dict) else None
    if not isinstance(node, dict) or parts[-1] not in node:
        return f"{key}: no such key in the recipe to remove (override '{item}')"
    del node[parts[-1]]
    return None


# ---------------------------------------------------------------------------------------------------- validation

# Keys a section accepts besides its fields: `data.dataset` is folded into `data.train` and `data.val` first.
_EXTRA_KEYS: dict[type, tuple[str, ...]] = {DataConfig: ("dataset",)}


def validate(
    raw: Mapping[str, Any],
    source: str,
    default_name: str = "run",
    problems: Sequence[str] = (),
    check_files: bool = True,
    this_machine: bool = True,
) -> Recipe:
    """The typed, frozen recipe, or RecipeError with every problem found (and `problems` found before), one
    line each. `check_files` and `this_machine` as in `load_recipe`."""
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
        # or mislead, so problems under those keys, or that reason about them, are left out.
        for problem in check_values(recipe, check_files, this_machine):
            if not _about_bad_keys(problem, checker.bad_keys):
                found.append(f"{source}: {problem}")
    if found:
        raise RecipeError(_relocate(found, origin))
    assert recipe is not None
    return recipe


def _about_bad_keys(problem: str, bad_keys: Sequence[str]) -> bool:
    """Whether `problem` is under a key that already has a problem, or names one (a dotted one: a top-level
    section's name is also a word of prose) in its reasoning ("give train.max_steps or train.max_epochs")."""
    key, _, message = problem.partition(":")
    named = [bad for bad in bad_keys if "." in bad and re.search(rf"(?<![\w.]){re.escape(bad)}(?!\w)", message)]
    return bool(named) or any(key == bad or key.startswith(bad + ".") for bad in bad_keys)


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
        kwargs = {k: v for k, v in value.items() if k != "_component_"}
        misspelt = [k for k in kwargs if _looks_like_component_key(str(k), "_component_" in value)]
        for k in misspelt:
            self.problem(f"{key}.{k}", "unknown key (did you mean '_component_'?)")
            del kwargs[k]
        target = value.get("_component_")
        if "_component_" not in value:
            if not misspelt:  # the misspelt key is the same problem
                self.problem(f"{key}._component_", "missing required value (a short name or a dotted path)")
            return _BAD
        if not isinstance(target, str) or not target.strip():
            what = "an empty string" if isinstance(target, str) else describe(target)
            self.problem(f"{key}._component_", f"expected a string (a short name or a dotted path), got {what}")
            return _BAD
        ok = True  # misspelt keys are left out: the rest of the component can still be checked
        for k, v in kwargs.items():
            if isinstance(v, str) and v == MISSING:
                self.problem(f"{key}.{k}", f"missing required value (give it on the command line: {key}.{k}=...)")
                ok = False
        return Component(target, types.MappingProxyType(copy.deepcopy(kwargs))) if ok else _BAD


def _looks_like_component_key(key: str, present: bool) -> bool:
    """`_componnt_`, `_component`, Hydra's `_target_`; without any `_component_`, also `component`, `compnent`."""
    if key == "_target_":
        return True
    if present and not (key.startswith("_") or key.endswith("_")):
        return False  # an argument that happens to look like the word
    return bool(difflib.get_close_matches(key, ["_component_"], n=1, cutoff=0.8))


_BAD = object()


MAX_WORKERS = 256  # DataLoader worker processes per training process; each holds a copy of the dataset
MAX_TIMEOUT_S = 1e9  # about 30 years: Python's timedelta, which carries the timeout, ends a little further


def check_values(recipe: Recipe, check_files: bool = True, this_machine: bool = True) -> list[str]:
    """Problems a type cannot express: ranges, combinations, components that do not import or would not build,
    missing files, and (with `this_machine`) what this machine cannot do. Each is `key.path: message`."""
    return [
        *_check_train(recipe.train),
        *(_check_machine(recipe) if this_machine else []),
        *_check_strategy(recipe),
        *_check_components(recipe, check_files, this_machine),
        *_check_evaluation(recipe),
        *_check_logging(recipe.logging, check_files),
        *_check_resume(recipe.resume),
    ]


def _check_train(t: TrainConfig) -> list[str]:
    problems = []
    if t.max_steps is None and t.max_epochs is None:
        problems.append("train: give train.max_steps or train.max_epochs")
    problems += _at_least(
        ("train.max_steps", t.max_steps, 1),
        ("train.max_epochs", t.max_epochs, 1),
        ("train.batch_size", t.batch_size, 1),
        ("train.gradient_accumulation_steps", t.gradient_accumulation_steps, 1),
        ("train.max_nonfinite_steps", t.max_nonfinite_steps, 1),
    )
    if not 0 <= t.seed < components.SEED_LIMIT:
        problems.append(f"train.seed: must be in [0, 2**32) (numpy takes 32-bit seeds), got {t.seed}")
    if t.max_time_s is not None and not t.max_time_s > 0:
        problems.append(f"train.max_time_s: must be > 0, got {t.max_time_s}")
    if t.clip_grad_norm is not None and not t.clip_grad_norm > 0:
        problems.append(f"train.clip_grad_norm: must be > 0, or null for no clipping; got {t.clip_grad_norm}")
    return problems


def _at_least(*checks: tuple[str, int | None, int]) -> list[str]:
    return [f"{key}: must be >= {low}, got {value}" for key, value, low in checks if value is not None and value < low]


def _check_machine(recipe: Recipe) -> list[str]:
    """What this machine cannot do (the same checks run again where the run starts: loop.preflight)."""
    if recipe.train.mixed_precision == "fp16":
        import torch

        if not torch.cuda.is_available():
            return ["train.mixed_precision: fp16 needs a CUDA GPU; use bf16 or no on CPU"]
    return []


def _check_components(recipe: Recipe, check_files: bool, this_machine: bool) -> list[str]:
    d = recipe.data
    problems = _at_least(("data.num_workers", d.num_workers, 0))
    if d.num_workers > MAX_WORKERS:
        problems.append(f"data.num_workers: must be <= {MAX_WORKERS} (processes per trainer), got {d.num_workers}")
    found, facts = component_checks.check_split("data.train", d.train, check_files, this_machine)
    problems += found
    if d.val is not None:
        problems += component_checks.check_split("data.val", d.val, check_files, this_machine)[0]
    if facts is not None:
        processes = component_checks.launched_processes() if this_machine else 1
        problems += component_checks.check_batches(recipe, facts.samples, processes)
    problems += component_checks.check_model(recipe, facts, this_machine)
    problems += component_checks.check_loss(recipe)
    problems += component_checks.check_optimizer(recipe.optimizer, component_checks.built_in_model(recipe))
    problems += component_checks.check_scheduler(recipe.scheduler)
    return problems


def _check_evaluation(recipe: Recipe) -> list[str]:
    """Evaluation, and what watches its metrics: early stopping and the best checkpoints."""
    e, c, es = recipe.eval, recipe.checkpoint, recipe.early_stopping
    problems = _at_least(
        ("eval.every_steps", e.every_steps, 1),
        ("eval.max_batches", e.max_batches, 1),
        ("eval.batch_size", e.batch_size, 1),
        ("checkpoint.keep_last", c.keep_last, 1),
        ("checkpoint.every_steps", c.every_steps, 1),
        ("checkpoint.keep_best", c.keep_best, 0),
    )
    evaluates = recipe.data.val is not None and (e.every_steps is not None or e.every_epoch)
    metrics = component_checks.evaluation_metrics(recipe.loss)
    if es is not None:
        problems += _at_least(("early_stopping.patience", es.patience, 0))
        if not es.min_delta >= 0:
            problems.append(f"early_stopping.min_delta: must be >= 0, got {es.min_delta}")
        problems += _monitor_problems("early_stopping.monitor", es.monitor, metrics)
        if not evaluates:
            problems.append(
                "early_stopping: needs evaluation: set data.val and eval.every_steps or eval.every_epoch, "
                "or early_stopping=null"
            )
    if c.keep_best:
        problems += _monitor_problems("checkpoint.monitor", c.monitor, metrics)
        if not evaluates:
            problems.append("checkpoint.keep_best: needs evaluation: set data.val and eval.every_steps or every_epoch")
    return problems


def _monitor_problems(key: str, name: str, metrics: tuple[str, ...] | None) -> list[str]:
    """A monitored metric the evaluation will produce: the line training would give at its first evaluation.
    `metrics` None: not known before training (a loss built by a function), so any validation metric goes."""
    if metrics is None:
        if name.startswith("val/"):
            return []
        return [f"{key}: expected a validation metric such as val/loss or val/accuracy, got {name!r}"]
    if name not in metrics:
        return [f"{key}: {name!r} is not a validation metric of this run (it has: {', '.join(sorted(metrics))})"]
    return []


def _check_logging(lg: LoggingConfig, check_files: bool) -> list[str]:
    problems = _at_least(("logging.every_steps", lg.every_steps, 1))
    for name in lg.trackers:
        if name not in TRACKERS:
            problems.append(f"logging.trackers: unknown tracker {name!r}; expected some of: {', '.join(TRACKERS)}")
        elif check_files and name not in BUILT_IN_TRACKERS and importlib.util.find_spec(name) is None:
            problems.append(
                f"logging.trackers: {name} is not installed here (pip install {name.replace('_', '-')}), "
                "or leave it out of the list"
            )
    return problems


def _check_resume(resume: str) -> list[str]:
    by_name = Path(resume).name in ("latest", "best") and Path(resume).parent.is_dir()
    if resume in ("none", "auto") or Path(resume).is_dir() or by_name:
        return []
    return [
        f"resume: expected none, auto, a checkpoint directory or <checkpoints>/latest|best; {resume!r} is not a "
        "directory"
    ]


def _check_strategy(recipe: Recipe) -> list[str]:
    s, t = recipe.strategy, recipe.train
    problems = []
    if not 0 < s.timeout_s <= MAX_TIMEOUT_S:
        problems.append(f"strategy.timeout_s: must be > 0 and at most {MAX_TIMEOUT_S:g} seconds, got {s.timeout_s}")
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


# ---------------------------------------------------------------------------------------------------- helpers


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
