"""The package keeps the shape that makes it readable: small modules, a short loop, imports in one direction,
strategy names compared only by the strategies themselves, no private names borrowed across modules."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "launcher"
STRATEGY_NAMES = {"ddp", "fsdp", "deepspeed"}


def modules() -> dict[str, ast.Module]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = ast.parse(path.read_text(), filename=str(path))
    return found


def source_lines(name: str) -> int:
    path = PACKAGE.parent / Path(*name.split("."))
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    return len(path.read_text().splitlines())


def imports(name: str, tree: ast.Module, known: set[str]) -> set[str]:
    """The package's modules `name` imports, at any depth of its code (TYPE_CHECKING and function-level
    imports included): `from launcher.x import y` counts as launcher.x.y where that is a module, else launcher.x."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name in known}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("launcher"):
            subs = {f"{node.module}.{alias.name}" for alias in node.names} & known
            found |= subs
            if len(subs) < len(node.names) and node.module in known:
                found.add(node.module)
    return found - {name}


def test_no_module_is_over_400_lines_and_the_loop_is_at_most_250():
    sizes = {name: source_lines(name) for name in modules()}
    assert {name: n for name, n in sizes.items() if n > 400} == {}
    assert sizes["launcher.loop"] <= 250


def test_no_function_is_over_60_lines():
    long = [
        f"{name}.{node.name}: {node.end_lineno - node.lineno + 1} lines"
        for name, tree in modules().items()
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60
    ]
    assert long == []


def cycle(graph: dict[str, set[str]]) -> list[str]:
    """An import cycle in `graph` (module -> modules it imports), as the path round it; [] when there is none."""
    visiting: list[str] = []
    done: set[str] = set()

    def visit(name: str) -> list[str]:
        if name in done:
            return []
        if name in visiting:
            return [*visiting[visiting.index(name) :], name]
        visiting.append(name)
        for other in sorted(graph.get(name, ())):
            found = visit(other)
            if found:
                return found
        visiting.pop()
        done.add(name)
        return []

    for name in sorted(graph):
        found = visit(name)
        if found:
            return found
    return []


def test_the_import_graph_has_no_cycle():
    trees = modules()
    graph = {name: imports(name, tree, set(trees)) for name, tree in trees.items()}
    assert " -> ".join(cycle(graph)) == ""


# The rooms of docs/architecture.md, in order: a module imports only from its own room or those before it.
LAYERS = [
    ["launcher", "launcher.errors", "launcher.layout", "launcher.folders", "launcher.slurm_time", "launcher.storage"],
    [
        "launcher.components",
        "launcher.hub",
        "launcher.extensions",
        "launcher.losses",
        "launcher.batches",
        "launcher.chunked_loss",
        "launcher.precision",
        "launcher.models",
        "launcher.data",
        "launcher.schedules",
        "launcher.early_stopping",
    ],
    ["launcher.recipe.schema"],
    ["launcher.blocks", "launcher.compiling", "launcher.param_groups"],
    ["launcher.recipe.dialect", "launcher.recipe.build"],
    ["launcher.consensus"],
    ["launcher.strategies"],
    ["launcher.guards", "launcher.processes"],
    ["launcher.checkpoint"],
    ["launcher.recipe"],
    ["launcher.plan"],
    ["launcher.runlock", "launcher.preflight"],
    ["launcher.trainstate"],
    ["launcher.build"],
    [
        "launcher.rundir",
        "launcher.metrics",
        "launcher.trackers",
        "launcher.tracker_runs",
        "launcher.flops",
        "launcher.progress",
    ],
    ["launcher.evaluation", "launcher.saving", "launcher.updates", "launcher.profiling"],
    ["launcher.loop"],
    [
        "launcher.cli",
        "launcher.ckpt_commands",
        "launcher.__main__",
        "launcher.agent",
        "launcher.planning",
        "launcher.report",
        "launcher.diagnosis",
        "launcher.plots",
        "launcher.slurm",
        "launcher.activations",
        "launcher.sweep",
        "launcher.sweep_report",
    ],
]


def layer(module: str) -> int | None:
    """The room of `module`: the one naming it or, failing that, its closest package (`launcher` alone names only
    the package's own __init__)."""
    best: tuple[int, int] | None = None
    for i, room in enumerate(LAYERS):
        for prefix in room:
            inside = module.startswith(prefix + ".") and prefix != "launcher"
            if (module == prefix or inside) and (best is None or len(prefix) > best[1]):
                best = (i, len(prefix))
    return None if best is None else best[0]


def test_imports_go_one_way_through_the_rooms():
    trees = modules()
    assert [name for name in trees if layer(name) is None] == []
    upward = [
        f"{name} -> {other}"
        for name, tree in trees.items()
        for other in sorted(imports(name, tree, set(trees)))
        if layer(other) > layer(name)
    ]
    assert upward == []


def test_no_private_name_is_imported_across_modules():
    trees = modules()
    borrowed = []
    for name, tree in trees.items():
        aliases = {}  # local name -> package module
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("launcher"):
                for alias in node.names:
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        borrowed.append(f"{name}: from {node.module} import {alias.name}")
                    if f"{node.module}.{alias.name}" in trees:
                        aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
            elif isinstance(node, ast.Import):
                aliases |= {a.asname or a.name: a.name for a in node.names if a.name.startswith("launcher")}
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
            ):
                borrowed.append(f"{name}: {node.value.id}.{node.attr}")
    assert borrowed == []


def test_only_the_strategies_compare_strategy_names():
    comparisons = []
    for name, tree in modules().items():
        if name.startswith("launcher.strategies"):
            continue
        for node in ast.walk(tree):
            if not isinstance(node, ast.Compare):
                continue
            for operand in [node.left, *node.comparators]:
                values = operand.elts if isinstance(operand, (ast.Tuple, ast.List, ast.Set)) else [operand]
                named = {v.value for v in values if isinstance(v, ast.Constant)} & STRATEGY_NAMES
                if named:
                    comparisons.append(f"{name}:{node.lineno}: {ast.unparse(node)}")
    assert comparisons == []


def test_the_checks_see_what_they_look_for():
    """The AST checks above find a cycle, a borrowed private name and a strategy comparison when there is one."""
    a = ast.parse("from launcher import b\nfrom launcher.c import _hidden\nif s.name == 'fsdp': pass")
    assert imports("launcher.a", a, {"launcher.a", "launcher.b", "launcher.c"}) == {"launcher.b", "launcher.c"}
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert layer("launcher.checkpoint.writer") > layer("launcher.strategies.fsdp") > layer("launcher")
    assert cycle({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    compare = next(n for n in ast.walk(a) if isinstance(n, ast.Compare))
    assert {c.value for c in compare.comparators if isinstance(c, ast.Constant)} & STRATEGY_NAMES
