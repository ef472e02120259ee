"""The optimizer's parameter groups: weight decay only where it belongs, and per-group settings by name pattern.

`optimizer.decay` says which parameters the optimizer's `weight_decay` falls on:
- `matrices` (the default): parameters of two or more dimensions (the weights of linear layers, convolutions,
  attention) but embedding tables (and a head tied to one, which is the embedding's tensor); so not biases or norm
  weights either.
- `nanogpt`: nanoGPT's rule, every parameter of two or more dimensions, embeddings (and a tied head) included.
- `hf_trainer`: the Hugging Face Trainer's (`get_decay_parameter_names`): every parameter but those of
  `nn.LayerNorm` modules and those whose name (lower-cased) has `bias`, `layernorm`, `rmsnorm`, or `norm` as a
  name part or `_norm` ending one (RMSNorm weights go by name); embeddings and a tied head decay.
- `all`: every parameter, as a checkpoint written before the rule existed did.

`optimizer.groups` gives some parameters settings of their own: a list of `{params: PATTERN or [PATTERNS], lr: ...}`,
the patterns fnmatch globs on the names `named_parameters()` gives (`"*.bias"`, `"lm_head.*"`). The first group
whose pattern matches a parameter takes it; the rest stay in the default groups. A group's own keys win; one that
sets no `weight_decay` keeps the rule (its parameters split into a decaying and a non-decaying group).

Each recipe group's learning rate is logged as `lr/<name>`, its `name` (taken by the launcher, as `params` is) or
`group<i>` for the i-th group; `lr` is the default groups' (those that take the optimizer's own `lr`). The rule's
split does not make a group of its own in the logs: both halves have the group's rate.

Pure decisions on a model's parameters (meta, sharded DTensor or real: only names, shapes and identities count).
"""

from __future__ import annotations

import fnmatch
import inspect
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from launcher import components
from launcher.components import Component, describe

DECAY_MODES = ("matrices", "nanogpt", "hf_trainer", "all")
# The names the Hugging Face Trainer keeps from decay (`Trainer.get_decay_parameter_names`), matched in lower case.
HF_TRAINER_NO_DECAY = re.compile(r"bias|layernorm|rmsnorm|(?:^|\.)norm(?:$|\.)|_norm(?:$|\.)")
KEYS = ("decay", "groups")  # the launcher's own keys of the optimizer section, taken out before building it
if TYPE_CHECKING:
    import torch

NAMES_SHOWN = 4  # parameter names quoted when a pattern matches none
GROUP_KEYS = ("params", "name")  # a recipe group's keys that are the launcher's, not settings of the optimizer
# What every tracker takes in a metric's name (MLflow is the strictest: no `*`, brackets or colons).
NAME = re.compile(r"[A-Za-z0-9_.-]+")
DEFAULT_RATE_KEY = "lr"


@dataclass(frozen=True)
class Group:
    """One parameter group: its own settings over the optimizer's, its parameters and what `launcher plan` calls
    it."""

    label: str
    options: dict[str, Any] = field(default_factory=dict)
    params: list[torch.nn.Parameter] = field(default_factory=list)
    name: str | None = None  # the recipe group's name in the logs; None: a default group

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)


def launcher_keys(spec: Component) -> tuple[Component, str, list[Any]]:
    """The optimizer's own spec (the launcher's keys taken out), the decay rule and the groups as given."""
    kwargs = {k: v for k, v in spec.kwargs.items() if k not in KEYS}
    groups = spec.kwargs.get("groups") or []
    return Component(spec.target, kwargs), spec.kwargs.get("decay", "matrices"), groups


def group_options(optimizer: Any) -> list[str] | None:
    """The settings a param group of `optimizer` (a class) takes: its arguments but `params`; None where its
    signature does not say (it takes any keyword)."""
    try:
        params = inspect.signature(optimizer).parameters
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    return [n for n, p in params.items() if n != "params" and p.kind is not inspect.Parameter.VAR_POSITIONAL]


def form_problems(spec: Component, options: list[str] | None, name: str) -> list[str]:
    """One line per malformed `optimizer.decay` or `optimizer.groups` entry; `options`: what a group of the
    optimizer (called `name`) takes (None: anything)."""
    problems = []
    decay = spec.kwargs.get("decay", "matrices")
    if decay not in DECAY_MODES:
        problems.append(f"optimizer.decay: expected one of: {', '.join(DECAY_MODES)}, got {describe(decay)}")
    groups = spec.kwargs.get("groups")
    if groups is not None and not isinstance(groups, list):
        return [
            *problems,
            f"optimizer.groups: expected a list of {{params: PATTERN, <settings>}}, got {describe(groups)}",
        ]
    for i, group in enumerate(groups or []):
        key = f"optimizer.groups[{i}]"
        if not isinstance(group, Mapping):
            problems.append(f"{key}: expected a section {{params: PATTERN, <settings>}}, got {describe(group)}")
            continue
        if "params" not in group:
            problems.append(f"{key}.params: missing required value (a pattern or list of patterns)")
        elif not patterns_of(group["params"]):
            problems.append(f"{key}.params: expected a pattern or list of patterns, got {describe(group['params'])}")
        for option in group:
            if option not in GROUP_KEYS and options is not None and option not in options:
                problems.append(f"{key}.{option}: not an option of {name}'s groups (it takes: {', '.join(options)})")
    return problems + name_problems(groups or [])


def group_name(i: int, group: Mapping[str, Any]) -> str:
    """The name the logs give the recipe's i-th group: its own, or `group<i>`."""
    return str(group.get("name", f"group{i}"))


def name_problems(groups: list[Any]) -> list[str]:
    """One line per `name` of the recipe's groups that a tracker would refuse or that names two groups."""
    problems, seen = [], {}
    for i, group in enumerate(groups):
        if not isinstance(group, Mapping):
            continue
        given = group.get("name")
        if given is not None and not (isinstance(given, str) and NAME.fullmatch(given)):
            problems.append(
                f"optimizer.groups[{i}].name: expected a name of letters, digits, '_', '-' and '.', "
                f"got {describe(given)}"
            )
            continue
        name = group_name(i, group)
        if name in seen:
            problems.append(
                f"optimizer.groups[{i}].name: {name!r} is optimizer.groups[{seen[name]}]'s name too; each group's "
                "learning rate is logged under its own name"
            )
        seen.setdefault(name, i)
    return problems


def patterns_of(value: Any) -> list[str]:
    """A group's `params` as a list of patterns; [] when it is not a pattern or a non-empty list of them."""
    if isinstance(value, str) and value:
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) and v for v in value):
        return list(value)
    return []


def no_decay(model: torch.nn.Module, decay: str = "matrices") -> set[int]:
    """The identities of the parameters the rule `decay` keeps from decay (see the module's docstring); an
    embedding's is also a tied head's, which is the same Parameter."""
    from torch import nn

    if decay == "all":
        return set()
    if decay == "hf_trainer":
        kept = {id(p) for m in model.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters(recurse=False)}
        return kept | {id(p) for name, p in model.named_parameters() if HF_TRAINER_NO_DECAY.search(name.lower())}
    small = {id(p) for p in model.parameters() if p.ndim < 2}
    if decay == "nanogpt":
        return small
    return small | {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters(recurse=False)}


def unmatched(names: Iterable[str], groups: list[Any]) -> list[str]:
    """One line per pattern of well-formed `groups` that matches no parameter name."""
    names = list(names)
    problems = []
    for i, group in enumerate(groups):
        for pattern in patterns_of(group.get("params")):
            if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
                shown = ", ".join(names[:NAMES_SHOWN]) + (", ..." if len(names) > NAMES_SHOWN else "")
                problems.append(
                    f"optimizer.groups[{i}].params: {pattern!r} matches no parameter of the model "
                    f"(names look like: {shown})"
                )
    return problems


def first_matches(named: list[tuple[str, Any]], groups: list[Any]) -> dict[int, int]:
    """Parameter identity -> the index of the first group whose patterns match its name."""
    taken: dict[int, int] = {}
    for name, p in named:
        for i, group in enumerate(groups):
            if any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns_of(group["params"])):
                taken[id(p)] = i
                break
    return taken


def make_groups(model: torch.nn.Module, decay: str, groups: list[Any], weight_decay: float | None) -> list[Group]:
    """The param groups, empty ones left out, each in the model's order of parameters (tied ones once): the
    recipe's groups in order, then the default ones. `weight_decay`: the optimizer's own (None: it takes none, so
    the rule has nothing to split)."""
    # De-duplicated by identity, as model.parameters(); frozen parameters (a LoRA model's base) in no group: an
    # optimizer would keep state for them, and weight decay would change them.
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    kept = no_decay(model, decay) if weight_decay is not None else set()
    taken = first_matches(named, groups)
    out = []
    for i, group in [*enumerate(groups), (None, {})]:
        params = [p for _, p in named if taken.get(id(p)) == i]
        own = {k: v for k, v in group.items() if k not in GROUP_KEYS}
        where = "" if i is None else f" ({', '.join(patterns_of(group['params']))})"
        name = None if i is None else group_name(i, group)
        if "weight_decay" in own or not kept:  # the group's own decay, or nothing for the rule to keep from it
            out.append(Group(label_of(own, weight_decay, None) + where, own, params, name))
            continue
        decaying = [p for p in params if id(p) not in kept]
        out.append(Group(label_of(own, weight_decay, True) + where, own, decaying, name))
        not_decaying = [p for p in params if id(p) in kept]
        out.append(Group(label_of(own, weight_decay, False) + where, {**own, "weight_decay": 0.0}, not_decaying, name))
    return [g for g in out if g.params]


def rate_keys(groups: list[Group]) -> list[str]:
    """The metric each param group's learning rate is logged as, in the optimizer's order of groups."""
    return [DEFAULT_RATE_KEY if g.name is None else f"{DEFAULT_RATE_KEY}/{g.name}" for g in groups]


def rates(keys: list[str], lrs: list[float]) -> dict[str, float]:
    """The logged learning rates: `lr` first, then each named group's; of groups that share a key (the rule's
    halves of one group) the first's, as they have the same rate."""
    out: dict[str, float] = {}
    # Not strict: groups an optimizer adds to itself after it is built (add_param_group) have no key to log.
    pairs = zip(keys, lrs, strict=False)
    for key, lr in sorted(pairs, key=lambda pair: pair[0] != DEFAULT_RATE_KEY):
        out.setdefault(key, float(lr))
    return out


def groups_for(spec: Component, model: torch.nn.Module, decay: str | None = None) -> list[Group]:
    """The param groups of the optimizer `spec` over `model` (well-formed groups assumed, see `form_problems`);
    `decay` overrides the spec's rule (a resumed checkpoint's)."""
    own, chosen, groups = launcher_keys(spec)
    fn = components.resolve("optimizer", own.target)
    weight_decay = components.effective_args(fn, own.kwargs).get("weight_decay")
    return make_groups(model, decay or chosen, groups, weight_decay)


def setting(key: str, value: Any) -> str:
    shown = f"{value:g}" if isinstance(value, float) else str(value)
    return f"{'decay' if key == 'weight_decay' else key} {shown}"


def label_of(own: Mapping[str, Any], weight_decay: float | None, decays: bool | None) -> str:
    """How `launcher plan` names a group: its own settings, then its decay where the optimizer's applies
    (`decays`: the rule's choice; None: no split)."""
    parts = [setting(k, v) for k, v in own.items()]
    if "weight_decay" not in own and weight_decay is not None:
        parts.append("no decay" if decays is False else setting("weight_decay", float(weight_decay)))
    return ", ".join(parts) or "all parameters"


def to_torch(groups: list[Group]) -> list[dict[str, Any]]:
    """What a torch optimizer takes as its params."""
    return [{"params": g.params, **g.options} for g in groups]


def describe_groups(groups: list[Group]) -> list[str]:
    """`launcher plan`'s lines: one per group, its parameters and tensors."""
    lines = [f"{g.label}: {g.numel:,} parameters in {len(g.params)} tensors" for g in groups]
    return [f"{'param groups' if i == 0 else '':<14}{line}" for i, line in enumerate(lines)]
