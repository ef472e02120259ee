"""The recipe dialect: YAML as users expect it (YAML 1.2 scalars, no duplicate keys), `base:` composition,
deep merging, and `a.b=c` / `~a.b` overrides. Raw mappings in, raw mappings out: no types yet (see `build`).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from launcher.components import describe
from launcher.errors import RecipeError

MAX_NESTING = 100  # sections and lists within each other: a real recipe needs a handful


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's scalars, as users expect them: `1e-3` is a number, `no`/`on`/`yes`
    are strings (`mixed_precision: no`), only true/false are booleans; a key given twice is an error; and every
    failure is a YAMLError with its line, never another exception."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.open_keys: list[Any] = []  # the keys (list indices) of the collections being composed

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        # PyYAML composes nested collections recursively: refused well before Python's recursion limit would be hit.
        if not self.check_event(yaml.SequenceStartEvent, yaml.MappingStartEvent):
            return super().compose_node(parent, index)
        if len(self.open_keys) >= MAX_NESTING:
            raise NestingError(self.open_keys[1:], self.peek_event().start_mark)
        self.open_keys.append(index.value if isinstance(index, yaml.ScalarNode) else index)
        try:
            return super().compose_node(parent, index)
        finally:
            self.open_keys.pop()

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        """An explicit tag's constructor may fail with any exception (`!!float abc`, `!!timestamp bad`): it becomes
        a YAMLError at the value's line, as the parser's own complaints are."""
        try:
            return super().construct_object(node, deep=deep)
        except yaml.YAMLError:
            raise
        except Exception:
            tag = node.tag.replace("tag:yaml.org,2002:", "!!")
            shown = repr(_shortened(node.value)) if isinstance(node, yaml.ScalarNode) else "this value"
            raise yaml.constructor.ConstructorError(
                None, None, f"{tag} cannot make a value of {shown}", node.start_mark
            ) from None

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):  # `? [a, b]`: a list or a section as a key
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"a key must be a name, got {'a list' if isinstance(key, list) else 'a section'}",
                    key_node.start_mark,
                )
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


class NestingError(yaml.YAMLError):
    """Sections and lists nested more than MAX_NESTING levels deep: in the text, or through aliases (`&a` ...
    `*a`) that only the built value shows. `path`: the keys down to there; `mark`: where, when known."""

    def __init__(self, path: list[Any], mark: yaml.Mark | None = None):
        self.path, self.mark = path, mark
        super().__init__(self.problem())

    def problem(self, with_line: bool = True) -> str:
        line = f" (line {self.mark.line + 1})" if self.mark and with_line else ""
        return f"nested more than {MAX_NESTING} levels deep{line}; a recipe needs a handful"

    def key(self) -> str:
        """The first few keys of the path: enough to find the place, short enough for one line."""
        keys = []
        for part in self.path[:3]:
            if not isinstance(part, str):
                break
            keys.append(part)
        return ".".join(keys) or "(top level)"


def parse_yaml(text: str, depth: int = 0) -> Any:
    """The YAML value of `text`, or yaml.YAMLError; `depth`: how deep the value will sit in the recipe (an
    override's key path), which counts towards the nesting limit."""
    try:
        value = yaml.load(text, Loader=_Loader)
    except RecursionError:  # only where the caller's own stack is already deep: the composer refuses deep input
        raise NestingError([]) from None
    path = too_deep(value, MAX_NESTING - depth)
    if path is not None:
        raise NestingError(path)
    return value


def too_deep(value: Any, limit: int = MAX_NESTING) -> list[Any] | None:
    """The keys (and list indices) down to where `value` nests more than `limit` sections and lists, or None.

    Walked with a stack of its own, so no depth of input reaches Python's recursion limit, and each shared value
    (a YAML alias) once per depth it is met at, so aliases of aliases cannot make the walk exponential; an alias
    inside the value it names nests without end, and is found as too deep.
    """
    stack: list[tuple[Any, int, list[Any]]] = [(value, 1, [])] if isinstance(value, (dict, list)) else []
    deepest: dict[int, int] = {}
    while stack:
        node, depth, path = stack.pop()
        if deepest.get(id(node), 0) >= depth:
            continue
        if depth > limit:
            return path
        deepest[id(node)] = depth
        items = node.items() if isinstance(node, dict) else enumerate(node)
        stack.extend((child, depth + 1, [*path, key]) for key, child in items if isinstance(child, (dict, list)))
    return None


def _shortened(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
    except NestingError as e:
        raise RecipeError(f"{path}: {e.key()}: {e.problem()}") from None
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


def _override_problem(e: yaml.YAMLError) -> str:
    """The parser's complaint about an override's value, without a line and column (it has one line)."""
    return getattr(e, "problem", None) or str(e).splitlines()[0]


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
    parts = key.split(".")
    if len(parts) > MAX_NESTING:
        return f"{_shortened(key)}: a path of {len(parts)} keys nests more than {MAX_NESTING} levels deep"
    try:
        value = parse_yaml(text, depth=len(parts)) if text else None
    except NestingError as e:
        return f"{key}: the override value is {e.problem(with_line=False)}"
    except yaml.YAMLError as e:
        return f"{key}: the override value {_shortened(text)!r} is not valid YAML ({_override_problem(e)})"
    node = out
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
