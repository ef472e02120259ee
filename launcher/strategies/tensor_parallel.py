"""Tensor parallelism: each weight matrix of a model's blocks split over a group of processes (torch's DTensor
`parallelize_module`), so that a model too large for one process's share trains at all; FSDP2 shards what each
group holds across the groups (see `FSDP`).

A plan maps module-name patterns (fnmatch, `blocks.*.attn.q`) to how each module's weight splits:

- `colwise`: a Linear's output features (its weight's rows) split; its input whole, its output split on the last
  dimension (the heads of q/k/v, the hidden units of an MLP's first layer);
- `rowwise`: a Linear's input features split, its output summed over the group (attention's output projection,
  an MLP's last layer); an Embedding's vocabulary split, each token looked up where its row lives;
- `colwise_gather`: `colwise`, with the output gathered whole (the output head, whose logits the loss reads).

The built-in GPT and Hugging Face models that declare one (`base_model_tp_plan`: Llama, Mistral, Qwen, ...) bring
their own plan; `strategy.tp.plan` replaces it for any other module. Pure checks (`plan_problems`) run on the model
built on the meta device, before anything starts.
"""

from __future__ import annotations

import fnmatch
import math
import re
from typing import TYPE_CHECKING, Any

from torch import nn

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

    from launcher.recipe.schema import Recipe

STYLES = ("colwise", "rowwise", "colwise_gather")
# Hugging Face's style names (transformers' tensor_parallel.py) for what ours do; others are not taken.
HF_STYLES = {"colwise": "colwise", "rowwise": "rowwise", "colwise_gather_output": "colwise_gather"}


def model_plan(model: nn.Module) -> dict[str, str]:
    """The model's own plan: the built-in GPT's `tp_plan()`, or a Hugging Face model's (its config's
    `base_model_tp_plan` under the base model's prefix, its own `_tp_plan` for the head) with the input embedding
    split by vocabulary; empty when it has none."""
    own = getattr(model, "tp_plan", None)
    if callable(own):
        return dict(own())
    base = getattr(getattr(model, "config", None), "base_model_tp_plan", None)
    if not base:
        return {}
    prefix = getattr(model, "base_model_prefix", "")
    prefix = f"{prefix}." if prefix and hasattr(model, prefix) else ""
    # The model's `_tp_plan` holds its head's entry (with transformers 5, the whole plan, as built from the config).
    plan = {k: HF_STYLES.get(v, v) for k, v in (getattr(model, "_tp_plan", None) or {}).items()}
    plan.update({f"{prefix}{k}": HF_STYLES.get(v, v) for k, v in base.items()})
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    for name, module in model.named_modules():
        if module is embeddings:
            plan[name] = "rowwise"
    return plan


def plan_for(model: nn.Module, recipe: Recipe) -> dict[str, str]:
    """The run's plan: `strategy.tp.plan`, else the model's own."""
    return dict(recipe.strategy.tp.plan) or model_plan(model)


def matched(model: nn.Module, plan: dict[str, str]) -> dict[str, str]:
    """Each module the plan names, with its style (the first pattern that matches wins)."""
    found = {}
    for name, _ in model.named_modules():
        style = next((s for pattern, s in plan.items() if fnmatch.fnmatchcase(name, pattern)), None)
        if name and style is not None:
            found[name] = style
    return found


def plan_problems(model: nn.Module, recipe: Recipe) -> list[str]:
    """What keeps `strategy.tp` from splitting `model` (built on the meta device): no plan, a pattern that names no
    module, a style a module cannot take, or a size the group does not divide; `key: message` each."""
    size = recipe.strategy.tp.size
    if size <= 1:
        return []
    key = "strategy.tp.plan" if recipe.strategy.tp.plan else "strategy.tp"
    plan = plan_for(model, recipe)
    if not plan:
        return [
            f"strategy.tp: {type(model).__name__} has no tensor-parallel plan of its own; give one in strategy.tp.plan "
            "(module-name patterns: colwise, rowwise or colwise_gather; see docs/parallelism.md)"
        ]
    unknown = {pattern: s for pattern, s in plan.items() if s not in STYLES}
    if unknown:  # a Hugging Face plan may use styles of transformers' own (fused, expert-parallel, ...)
        pattern, s = next(iter(unknown.items()))
        return [
            f"strategy.tp: {type(model).__name__}'s own plan splits {pattern} as {s!r}, which the launcher does not "
            f"apply; give a plan of colwise, rowwise and colwise_gather in strategy.tp.plan"
        ]
    found = matched(model, plan)
    problems = [
        f"{key}: {pattern!r} names no module of {type(model).__name__}"
        for pattern in plan
        if not any(fnmatch.fnmatchcase(name, pattern) for name in found)
    ]
    modules = dict(model.named_modules())
    problems += [p for name, s in found.items() if (p := _type_problem(name, modules[name], s, key))]
    heads = [f"the model's {what} ({n})" for what, n in head_counts(model).items() if n % size]
    sizes = {name: _split_size(modules[name], s) for name, s in found.items()}
    uneven = [f"{name}'s {n} {which} features" for name, (n, which) in _known(sizes).items() if n % size]
    if heads or uneven:  # one line: the heads when they are the cause, else the first module and how many more
        more = f" (and {len(uneven) - 1} more modules)" if not heads and len(uneven) > 1 else ""
        problems.append(f"strategy.tp.size: {size} does not divide {(heads or uneven)[0]}{more}")
    return problems


def _known(sizes: dict[str, tuple[int, str] | None]) -> dict[str, tuple[int, str]]:
    return {name: size for name, size in sizes.items() if size is not None}


def _type_problem(name: str, module: nn.Module, style: str, key: str) -> str | None:
    """Why `module` cannot be split as `style` at all (None: it can)."""
    if isinstance(module, nn.Embedding):
        return None if style == "rowwise" else f"{key}: {name} is an Embedding: only rowwise splits it (its vocabulary)"
    if not isinstance(module, nn.Linear):
        return f"{key}: {name} is a {type(module).__name__}: only Linear and Embedding modules split"
    return None


def _split_size(module: nn.Module, style: str) -> tuple[int, str] | None:
    """The features of a Linear that a group must split evenly (a gathered output or a vocabulary need not)."""
    if not isinstance(module, nn.Linear) or style == "colwise_gather":
        return None
    return (module.in_features, "input") if style == "rowwise" else (module.out_features, "output")


def head_counts(model: nn.Module) -> dict[str, int]:
    """The attention head counts each tensor-parallel process must hold a whole share of."""
    config = getattr(model, "config", None)
    counts = {
        k.replace("_", " "): v
        for k in ("num_attention_heads", "num_key_value_heads")
        if isinstance(v := getattr(config, k, None), int)
    }
    heads = [m.n_head for m in model.modules() if isinstance(getattr(m, "n_head", None), int)]
    if heads:
        counts["attention heads"] = heads[0]
    return counts


def style(name: str, module: nn.Module) -> Any:
    """torch's ParallelStyle for one of `STYLES` on `module`."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    if name == "colwise":
        return ColwiseParallel()
    if name == "rowwise":
        # An Embedding's input is token ids, whole on every process (a Linear's is the last one's split output).
        return RowwiseParallel(input_layouts=Replicate()) if isinstance(module, nn.Embedding) else RowwiseParallel()
    return ColwiseParallel(output_layouts=Replicate())


def apply(model: nn.Module, mesh: DeviceMesh, recipe: Recipe) -> None:
    """Split `model`'s modules over `mesh` (the tensor-parallel group) as its plan says, in place. Tied weights
    (an output head sharing the input embedding's) stay tied: both split their rows alike."""
    from torch.distributed.tensor.parallel import parallelize_module

    ties, modules = tied(model), dict(model.named_modules())
    plan = {name: style(s, modules[name]) for name, s in matched(model, plan_for(model, recipe)).items()}
    parallelize_module(model, mesh, plan)
    for (owner, attr), (source, source_attr) in ties.items():
        setattr(owner, attr, getattr(source, source_attr))


def tied(model: nn.Module) -> dict[tuple[nn.Module, str], tuple[nn.Module, str]]:
    """Parameters that one module shares with another, each later holder with its first holder."""
    first: dict[int, tuple[nn.Module, str]] = {}
    ties = {}
    for module in model.modules():
        for attr, p in module.named_parameters(recurse=False):
            if id(p) in first:
                ties[(module, attr)] = first[id(p)]
            else:
                first[id(p)] = (module, attr)
    return ties


def split_dims(model: nn.Module, recipe: Recipe) -> dict[str, str]:
    """Each parameter's split over the tensor-parallel group, for `launcher plan`: `rows`, `columns` or absent
    (whole on every process)."""
    dims, modules = {}, dict(model.named_modules())
    for name, s in matched(model, plan_for(model, recipe)).items():
        rows = s != "rowwise" or isinstance(modules[name], nn.Embedding)
        dims[f"{name}.weight"] = "rows" if rows else "columns"
        if s != "rowwise":
            dims[f"{name}.bias"] = "rows"
    return dims


def split_parameters(model: nn.Module, recipe: Recipe) -> int:
    """How many of the model's parameters (tied ones once) the plan splits over the tensor-parallel group."""
    dims = split_dims(model, recipe)
    return sum(p.numel() for name, p in model.named_parameters() if name in dims)


def describe(model: nn.Module, recipe: Recipe, data_ranks: int) -> list[str]:
    """The lines `launcher plan` shows of the mesh and where each parameter lives: split over the
    tensor-parallel group (rows or columns) and, as FSDP2 does with everything, its first dimension over the data
    ranks; parameters alike in every block are shown once, with their count."""
    tp = recipe.strategy.tp.size
    source = "strategy.tp.plan" if recipe.strategy.tp.plan else "the model's own"
    plan = plan_for(model, recipe)
    lines = [
        f"mesh          {data_ranks * tp} processes = {data_ranks} data ranks (FSDP2) x {tp} tensor-parallel; each "
        f"group of {tp} consecutive ranks reads one batch",
        f"tp plan       ({source}) " + ", ".join(f"{pattern}: {s}" for pattern, s in plan.items()),
        "split         parameter [shape]: over the tensor-parallel group; on each process",
    ]
    dims, shown = split_dims(model, recipe), {}
    for name, p in model.named_parameters():
        key = re.sub(r"\.\d+\.", ".*.", name, count=1)  # the block's index
        if key in shown:
            shown[key][1] += 1
            continue
        local = list(p.shape)
        how = dims.get(name, "whole")
        if how != "whole":
            axis = 0 if how == "rows" else 1
            local[axis] = math.ceil(local[axis] / tp)
        if local:
            local[0] = math.ceil(local[0] / data_ranks)
        shown[key] = [f"{key} {list(p.shape)}: {how}; {local}", 1]
    lines += [f"              {text}{f' (x{n})' if n > 1 else ''}" for text, n in shown.values()]
    return lines


def local_shapes(model: nn.Module, recipe: Recipe) -> None:
    """Replace each module the plan splits (on the meta device) by one of a tensor-parallel process's shape, so
    that a forward there saves for backward what one process does (see launcher/activations.py)."""
    tp, modules = recipe.strategy.tp.size, dict(model.named_modules())
    for name, s in matched(model, plan_for(model, recipe)).items():
        module = modules[name]
        if s == "colwise_gather" or not isinstance(module, nn.Linear):
            continue  # its output is whole on every process
        rows, cols = module.out_features, module.in_features
        small = nn.Linear(cols // tp if s == "rowwise" else cols, rows if s == "rowwise" else rows // tp,
                          bias=module.bias is not None, device="meta")  # fmt: skip
        parent, _, attr = name.rpartition(".")
        setattr(modules[parent] if parent else model, attr, small)
