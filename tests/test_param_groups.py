"""The optimizer's parameter groups: weight decay on matrices only (embeddings, biases and norms kept from it), or
by nanoGPT's or the Hugging Face Trainer's rule, groups by name pattern with their own settings, the checks before a
run, `launcher plan`'s lines, and a resumed run's rule."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import run_cli
from safetensors.torch import load_file
from torch import nn

from launcher import build, param_groups
from launcher.components import Component
from launcher.recipe import load_recipe


class Tiny(nn.Module):
    """An embedding, a block (linear with bias, layer norm), and a head tied to the embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.wte = nn.Embedding(10, 4)
        self.fc = nn.Linear(4, 4)
        self.ln = nn.LayerNorm(4)
        self.out = nn.Linear(4, 4, bias=False)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.wte.weight


def names(model: nn.Module, group: param_groups.Group) -> list[str]:
    by_id = {id(p): n for n, p in model.named_parameters()}
    return [by_id[id(p)] for p in group.params]


def test_matrices_decay_and_embeddings_biases_norms_and_tied_heads_do_not():
    model = Tiny()
    decay, kept = param_groups.make_groups(model, "matrices", [], 0.1)
    assert names(model, decay) == ["fc.weight", "out.weight"] and decay.options == {}
    assert names(model, kept) == ["wte.weight", "fc.bias", "ln.weight", "ln.bias"]  # the tied head once
    assert kept.options == {"weight_decay": 0.0}
    (every,) = param_groups.make_groups(model, "all", [], 0.1)
    assert names(model, every) == [n for n, _ in model.named_parameters()] and every.options == {}
    # An optimizer without weight decay: nothing to split.
    assert [g.label for g in param_groups.make_groups(model, "matrices", [], None)] == ["all parameters"]


def test_the_first_matching_group_takes_a_parameter_and_its_own_keys_win():
    model = Tiny()
    groups = [
        {"params": "out.*", "lr": 0.01},
        {"params": ["fc.*", "out.weight"], "lr": 0.02, "weight_decay": 0.5},
        {"params": "nothing.left.*", "lr": 0.03},
    ]
    made = param_groups.make_groups(model, "matrices", groups, 0.1)
    assert [(g.label, names(model, g)) for g in made] == [
        ("lr 0.01, decay 0.1 (out.*)", ["out.weight"]),
        ("lr 0.02, decay 0.5 (fc.*, out.weight)", ["fc.weight", "fc.bias"]),  # its weight_decay: no split
        ("no decay", ["wte.weight", "ln.weight", "ln.bias"]),  # empty groups are left out
    ]
    assert made[1].options == {"lr": 0.02, "weight_decay": 0.5}
    lines = param_groups.describe_groups(made)
    assert lines[0] == "param groups  lr 0.01, decay 0.1 (out.*): 16 parameters in 1 tensors"
    assert lines[2].startswith("              no decay: ")


class Decoder(nn.Module):
    """A decoder named as Hugging Face's are: RMSNorms known by their names only, a LayerNorm by its type."""

    def __init__(self) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(10, 4)
        self.q_proj = nn.Linear(4, 4)
        self.input_layernorm = nn.RMSNorm(4)
        self.k_norm = nn.RMSNorm(4)
        self.ln = nn.LayerNorm(4)
        self.norm = nn.RMSNorm(4)
        self.lm_head = nn.Linear(4, 10, bias=False)
        self.lm_head.weight = self.embed_tokens.weight


@pytest.mark.parametrize(
    ("rule", "decaying"),
    [
        ("matrices", ["q_proj.weight"]),
        ("nanogpt", ["embed_tokens.weight", "q_proj.weight"]),
        # As transformers' Trainer.get_decay_parameter_names gives for this model.
        ("hf_trainer", ["embed_tokens.weight", "q_proj.weight"]),
        ("all", None),
    ],
)
def test_each_decay_rule_decays_what_its_namesake_does(rule: str, decaying: list[str] | None):
    model = Decoder()
    made = param_groups.make_groups(model, rule, [], 0.1)
    if decaying is None:
        assert [g.label for g in made] == ["decay 0.1"] and len(made[0].params) == len(list(model.parameters()))
        return
    assert names(model, made[0]) == decaying and made[0].label == "decay 0.1"
    assert set(names(model, made[1])) == {n for n, _ in model.named_parameters()} - set(decaying)


def test_hf_trainer_rule_goes_by_name_where_the_module_is_no_layer_norm():
    model = nn.ModuleDict({"block": Decoder(), "final_norm": nn.Linear(4, 4), "normal": nn.Linear(4, 4)})
    kept = param_groups.no_decay(model, "hf_trainer")
    by_id = {id(p): n for n, p in model.named_parameters()}
    assert sorted(by_id[i] for i in kept if i in by_id) == [
        "block.input_layernorm.weight",
        "block.k_norm.weight",
        "block.ln.bias",
        "block.ln.weight",
        "block.norm.weight",
        "block.q_proj.bias",
        "final_norm.bias",
        "final_norm.weight",  # `_norm` ends a name part: kept, as the Trainer keeps it
        "normal.bias",
    ]  # `normal.weight` decays: `norm` is not a whole name part there (the Trainer's list, checked once by hand)


def test_malformed_decay_and_groups_are_one_line_each():
    spec = Component(
        "adamw", {"decay": "some", "groups": [{"params": ["*.bias", 3]}, {"lr": 0.1}, "x", {"params": "a", "foo": 1}]}
    )
    assert param_groups.form_problems(spec, ["lr", "betas"], "torch.optim.AdamW") == [
        "optimizer.decay: expected one of: matrices, nanogpt, hf_trainer, all, got a string ('some')",
        "optimizer.groups[0].params: expected a pattern or list of patterns, got a list (['*.bias', 3])",
        "optimizer.groups[1].params: missing required value (a pattern or list of patterns)",
        "optimizer.groups[2]: expected a section {params: PATTERN, <settings>}, got a string ('x')",
        "optimizer.groups[3].foo: not an option of torch.optim.AdamW's groups (it takes: lr, betas)",
    ]
    assert param_groups.unmatched(["wte.weight", "fc.bias"], [{"params": ["fc.*", "lm_haed.*"]}]) == [
        "optimizer.groups[0].params: 'lm_haed.*' matches no parameter of the model (names look like: wte.weight, "
        "fc.bias)"
    ]


def test_group_names_are_ones_every_tracker_takes_and_name_one_group_each():
    groups = [{"params": "a", "name": "embed"}, {"params": "b", "name": "lr*"}, {"params": "c"}, {"params": "d"}]
    groups += [{"params": "e", "name": "group2"}, {"params": "f", "name": "embed"}]
    assert param_groups.form_problems(Component("adamw", {"groups": groups}), ["lr"], "torch.optim.AdamW") == [
        "optimizer.groups[1].name: expected a name of letters, digits, '_', '-' and '.', got a string ('lr*')",
        "optimizer.groups[4].name: 'group2' is optimizer.groups[2]'s name too; each group's learning rate is logged "
        "under its own name",
        "optimizer.groups[5].name: 'embed' is optimizer.groups[0]'s name too; each group's learning rate is logged "
        "under its own name",
    ]


def test_group_settings_reach_the_optimizer(tiny_recipe: Path):
    recipe = load_recipe(
        tiny_recipe,
        ["optimizer._component_=adamw", "optimizer.weight_decay=0.2", "optimizer.groups=[{params: net.0.*, lr: 0.5}]"],
    )
    model = torch.nn.Sequential()
    model.net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))
    optimizer, keys = build.make_optimizer(recipe, model, "matrices", {})
    settings = [(g["lr"], g["weight_decay"], len(g["params"])) for g in optimizer.param_groups]
    assert settings == [(0.5, 0.2, 1), (0.5, 0.0, 1), (0.003, 0.2, 1), (0.003, 0.0, 1)]
    assert keys == ["lr/group0", "lr/group0", "lr", "lr"]  # the rule's halves share their group's name


def test_a_resumed_run_keeps_the_rule_its_checkpoint_was_written_with(tiny_recipe: Path):
    said: list[str] = []
    recipe = load_recipe(tiny_recipe)
    assert build.decay_rule(recipe, None, said.append) == "matrices" and said == []
    assert build.decay_rule(recipe, {"decay": "matrices"}, said.append) == "matrices" and said == []
    assert build.decay_rule(recipe, {"step": 3}, said.append) == "all"  # written before the rule existed
    assert said == [
        "note: this checkpoint was written with weight decay on every parameter; the resumed run keeps that "
        "(optimizer.decay=all)"
    ]
    assert (
        build.decay_rule(load_recipe(tiny_recipe, ["optimizer.decay=all"]), {"decay": "matrices"}, said.append)
        == "matrices"
    )
    assert said[-1] == "note: this checkpoint was written with optimizer.decay=matrices; the resumed run keeps that"


def test_a_pattern_matching_no_parameter_is_refused_and_plan_shows_the_groups(tiny_recipe: Path):
    bad = run_cli("validate", str(tiny_recipe), "optimizer.groups=[{params: 'lm_haed.*', lr: 0.001}]")
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        f"error: {tiny_recipe}: optimizer.groups[0].params: 'lm_haed.*' matches no parameter of the model "
        "(names look like: net.0.weight, net.0.bias, net.3.weight, net.3.bias)"
    ]
    planned = run_cli("plan", str(tiny_recipe), "optimizer.groups=[{params: '*.bias', lr: 0.001}]")
    assert planned.returncode == 0, planned.stderr
    assert "param groups  lr 0.001, no decay (*.bias): 35 parameters in 2 tensors\n" in planned.stdout
    assert "              decay 0: 352 parameters in 2 tensors\n" in planned.stdout


@pytest.mark.slow
def test_a_run_with_groups_resumes_to_the_same_weights(tiny_recipe: Path, tmp_path: Path):
    groups = [
        "optimizer._component_=adamw",
        "optimizer.weight_decay=0.1",
        "optimizer.groups=[{params: 'net.3.*', lr: 0.01}]",
    ]
    full, parts = tmp_path / "full", tmp_path / "parts"
    assert run_cli("train", str(tiny_recipe), *groups, f"run_dir={full}", "train.max_steps=30").returncode == 0
    assert run_cli("train", str(tiny_recipe), *groups, f"run_dir={parts}", "train.max_steps=20").returncode == 0
    resumed = run_cli("train", str(tiny_recipe), *groups, f"run_dir={parts}", "train.max_steps=30", "resume=auto")
    assert resumed.returncode == 0, resumed.stderr
    assert "note:" not in resumed.stdout  # the checkpoint recorded the rule the recipe asks for
    ends = [load_file(run / "checkpoints" / "step_00000030" / "model.safetensors") for run in (full, parts)]
    assert all(torch.equal(ends[0][k], ends[1][k]) for k in ends[0])
