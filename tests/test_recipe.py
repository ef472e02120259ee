"""Recipe loading: composition, overrides, typing and freezing, without training anything."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, SHAKESPEARE, cli_in_process, refused_alike

from launcher.errors import RecipeError
from launcher.recipe import CheckpointConfig, StrategyConfig, apply_overrides, deep_merge, dump, load_recipe, parse_yaml


def test_quickstart_loads_typed_and_frozen():
    recipe = load_recipe(REPO / "recipes" / "quickstart.yaml")
    assert recipe.name == "quickstart"
    assert recipe.run_dir == "runs/quickstart"
    assert recipe.optimizer.kwargs["lr"] == pytest.approx(3e-4)
    assert recipe.train.batch_size == 64
    assert recipe.data.train.kwargs["split"] == "train" and recipe.data.val.kwargs["split"] == "val"
    with pytest.raises(dataclasses.FrozenInstanceError):
        recipe.train.batch_size = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        recipe.optimizer.kwargs["lr"] = 1.0  # type: ignore[index]


def test_overrides_are_typed_yaml_scalars():
    recipe = load_recipe(
        REPO / "recipes" / "quickstart.yaml",
        ["optimizer.lr=1e-3", "train.max_steps=50", "model.hidden_sizes=[16, 8]", "early_stopping=null"],
    )
    assert recipe.optimizer.kwargs["lr"] == 1e-3 and isinstance(recipe.optimizer.kwargs["lr"], float)
    assert recipe.train.max_steps == 50
    assert recipe.model.kwargs["hidden_sizes"] == [16, 8]
    assert recipe.early_stopping is None


def test_scientific_notation_without_dot_is_a_float():
    assert parse_yaml("lr: 3e-4") == {"lr": 3e-4}
    assert parse_yaml("x: 1_000") == {"x": 1000}
    assert parse_yaml("v: 1.0") == {"v": 1.0}


def test_override_creates_missing_sections_and_refuses_scalars_as_sections():
    assert apply_overrides({}, ["a.b.c=1"], "r.yaml") == ({"a": {"b": {"c": 1}}}, [])
    assert apply_overrides({"a": 1}, ["a.b=2"], "r.yaml") == (
        {"a": 1},
        ["r.yaml: a: is a number (1), not a section (override 'a.b=2')"],
    )


def test_yaml_1_2_scalars_and_duplicate_keys():
    assert parse_yaml("a: no\nb: on\nc: yes\nd: false\ne: True") == {
        "a": "no",
        "b": "on",
        "c": "yes",
        "d": False,
        "e": True,
    }
    with pytest.raises(yaml.YAMLError, match="the key 'lr' is given twice"):
        parse_yaml("lr: 1\nlr: 2\n")


def test_base_composition_deep_merges_and_replaces_changed_components(tmp_path: Path):
    (tmp_path / "base.yaml").write_text(
        "model: {_component_: mlp, hidden_sizes: [4], dropout: 0.1}\n"
        "optimizer: {_component_: sgd, lr: 0.1, momentum: 0.9}\n"
        "data: {train: {_component_: synthetic_classification}}\n"
        "train: {max_steps: 5, batch_size: 8}\n"
    )
    (tmp_path / "child.yaml").write_text(
        "base: base.yaml\nmodel: {dropout: 0.2}\noptimizer: {_component_: adamw, lr: 0.01}\ntrain: {batch_size: 4}\n"
    )
    recipe = load_recipe(tmp_path / "child.yaml")
    assert recipe.name == "child"
    assert dict(recipe.model.kwargs) == {"hidden_sizes": [4], "dropout": 0.2}
    # A different optimizer class does not inherit the old one's arguments (momentum means nothing to AdamW).
    assert recipe.optimizer.target == "adamw" and dict(recipe.optimizer.kwargs) == {"lr": 0.01}
    assert recipe.train.max_steps == 5 and recipe.train.batch_size == 4


def test_deep_merge_does_not_mutate_inputs():
    base = {"a": {"b": [1]}}
    top = {"a": {"c": 2}}
    merged = deep_merge(base, top)
    merged["a"]["b"].append(9)
    assert base == {"a": {"b": [1]}} and top == {"a": {"c": 2}}


def test_every_problem_is_reported_at_once(tmp_path: Path):
    path = tmp_path / "bad.yaml"
    path.write_text(
        "model: {_component_: mlp}\n"
        "data: {train: {_component_: synthetic_classification}}\n"
        "optimizer: {_component_: adam, lr: -1}\n"
        "train: {max_steps: 0, batch_size: two, mixed_precision: fp8}\n"
        "checkpoint: {keep_last: 0}\n"
        "loging: {}\n"
    )
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    problems = info.value.problems
    assert all(p.startswith(f"{path}: ") for p in problems)
    assert [p.removeprefix(f"{path}: ") for p in problems] == [
        "loging: unknown key (did you mean 'logging'? a recipe takes: name, run_dir, resume, model, data, loss, "
        "optimizer, scheduler, train, eval, early_stopping, checkpoint, logging, strategy, slurm, profile)",
        "train.batch_size: expected an integer, got a string ('two')",
        "train.mixed_precision: expected one of: no, bf16, fp16; got a string ('fp8')",
        "train.max_steps: must be >= 1, got 0",
        "optimizer.lr: must be a number > 0, got a number (-1)",
        "checkpoint.keep_last: must be >= 1, got 0",
    ]


def test_dump_round_trips(tmp_path: Path):
    recipe = load_recipe(REPO / "recipes" / "quickstart.yaml", ["optimizer.lr=1e-3"])
    saved = tmp_path / "saved.yaml"
    saved.write_text(dump(recipe))
    assert load_recipe(saved) == recipe


def test_user_component_beside_the_recipe_is_importable(tmp_path: Path):
    (tmp_path / "mynets.py").write_text("import torch\nclass Net(torch.nn.Linear):\n    pass\n")
    (tmp_path / "r.yaml").write_text(
        "model: {_component_: mynets.Net, in_features: 8, out_features: 2}\n"
        "data: {train: {_component_: synthetic_classification}}\n"
        "optimizer: {_component_: sgd, lr: 0.1}\ntrain: {max_steps: 1}\n"
    )
    assert load_recipe(tmp_path / "r.yaml").model.target == "mynets.Net"


# Overrides a shipped recipe needs to validate (its required values, its data files); every recipe in recipes/ is
# checked. The GPT recipes get byte-level token files of the same corpus.
def required_overrides(name: str, tokens: Path) -> list[str]:
    if name == "charlm.yaml":
        return [f"data.dataset.path={SHAKESPEARE}"]
    if name.startswith("gpt_"):
        return [f"data.dataset.path={tokens}/{{split}}.bin"]
    if name == "hf_causal_lm.yaml":
        return [f"data.dataset.path={SHAKESPEARE}", f"data.dataset.cache_dir={tokens}/cache"]
    if name == "hf_classify.yaml":
        rows = "".join(f'"line {i} of the text",{"yes" if i % 3 else "no"}\n' for i in range(60))
        (tokens / "labels.csv").write_text("text,label\n" + rows)
        return [f"data.dataset.path={tokens}/labels.csv", f"data.dataset.cache_dir={tokens}/cache"]
    return []


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "recipes").glob("*.yaml")))
def test_every_shipped_recipe_validates(name: str, tmp_path: Path):
    overrides = required_overrides(name, tmp_path)
    if overrides and not SHAKESPEARE.is_file():
        pytest.skip(f"needs {SHAKESPEARE}")
    if name.startswith("gpt_"):
        from launcher.data.memmap import write_bytes

        write_bytes(SHAKESPEARE, tmp_path)
    assert load_recipe(REPO / "recipes" / name, overrides).name == name.removesuffix(".yaml")


# ---------------------------------------------------------------------------------------------------- overrides

BASE_A = "model: {_component_: mlp, hidden_sizes: [4]}\noptimizer: {_component_: sgd, lr: 0.1}\n"
BASE_B = "model: {_component_: mlp, hidden_sizes: [2]}\noptimizer: {_component_: adam, lr: 0.01}\n"
CHILD = "base: a.yaml\ndata: {train: {_component_: synthetic_classification}}\ntrain: {max_steps: 5}\n"


def test_a_base_override_replaces_the_chain(tmp_path: Path):
    (tmp_path / "a.yaml").write_text(BASE_A)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "b.yaml").write_text(BASE_B)
    (tmp_path / "child.yaml").write_text(CHILD)
    assert load_recipe(tmp_path / "child.yaml").optimizer.target == "sgd"
    # Relative to the recipe's folder, wherever it stands among the overrides (it is applied before them).
    recipe = load_recipe(tmp_path / "child.yaml", ["optimizer.lr=0.5", "base=other/b.yaml"])
    assert recipe.optimizer.target == "adam" and recipe.optimizer.kwargs["lr"] == 0.5
    assert recipe.model.kwargs["hidden_sizes"] == [2]
    with pytest.raises(RecipeError) as info:
        load_recipe(tmp_path / "child.yaml", ["base=missing.yaml"])
    assert info.value.problems == [f"{tmp_path / 'child.yaml'}: base: no such recipe file: {tmp_path / 'missing.yaml'}"]
    with pytest.raises(RecipeError) as info:  # no base at all: the child alone has no model
        load_recipe(tmp_path / "child.yaml", ["~base"])
    assert [p.split(": ")[1] for p in info.value.problems] == ["model", "optimizer"]


def test_tilde_removes_a_key_and_a_missing_one_is_refused():
    assert apply_overrides({"a": {"b": 1, "c": 2}}, ["~a.b"], "r.yaml") == ({"a": {"c": 2}}, [])
    assert apply_overrides({"a": 1}, ["~a.b", "~x"], "r.yaml")[1] == [
        "r.yaml: a.b: no such key in the recipe to remove (override '~a.b')",
        "r.yaml: x: no such key in the recipe to remove (override '~x')",
    ]
    recipe = load_recipe(
        REPO / "recipes" / "quickstart.yaml", ["~early_stopping", "~scheduler", "eval.max_batches=null"]
    )
    assert recipe.early_stopping is None and recipe.scheduler.target == "constant"
    assert recipe.eval.max_batches is None  # key=null still sets null


# ---------------------------------------------------------------------------------------------------- built-in checks


def refusals(overrides: list[str], **kwargs) -> list[str]:
    with pytest.raises(RecipeError) as info:
        load_recipe(REPO / "recipes" / "quickstart.yaml", overrides, **kwargs)
    return [p.split(": ", 1)[1] for p in info.value.problems]


def test_machine_checks_are_left_to_the_machine_that_trains():
    overrides = ["train.mixed_precision=fp16", "model.hidden_sizes=[1000000, 1000000]"]  # 4 TB of parameters
    found = refusals(overrides)
    assert any(p.startswith("model: its 1,000,038,000,004 parameters take 3725.4 GiB") for p in found), found
    if not torch.cuda.is_available():
        assert "train.mixed_precision: fp16 needs a CUDA GPU; use bf16 or no on CPU" in found
    assert load_recipe(REPO / "recipes" / "quickstart.yaml", overrides, this_machine=False).train.mixed_precision


def test_a_text_set_is_opened_as_training_opens_it(tmp_path: Path):
    text = tmp_path / "tiny.txt"
    text.write_text("hello world, " * 20)
    overrides = [f"data.dataset.path={text}", "data.dataset.block_size=16", "model.n_embd=32", "model.n_head=4"]
    charlm = REPO / "recipes" / "charlm.yaml"
    assert load_recipe(charlm, overrides).data.train.kwargs["block_size"] == 16
    with pytest.raises(RecipeError) as info:
        load_recipe(charlm, [*overrides, "data.dataset.block_size=1000", "model.block_size=8"])
    assert [p.split(": ", 2)[1] for p in info.value.problems] == ["data.train", "data.val"]  # as training says
    assert "fewer than block_size + 1 (LAUNCHER_FULL_ERROR=1 shows the traceback)" in info.value.problems[0]
    with pytest.raises(RecipeError) as info:  # the recipe's block_size wins over the data's: too short for it
        load_recipe(charlm, [*overrides, "model.block_size=8"])
    assert info.value.problems == [f"{charlm}: model.block_size: is 8, less than the data's 16 (tokens per sample)"]


def test_built_in_components_check_their_own_arguments():
    from launcher.data.memmap import TokenMemmap
    from launcher.data.synthetic import SyntheticClassification
    from launcher.models.gpt import GPT
    from launcher.models.mlp import MLP

    assert MLP.check_args({"in_features": 4, "num_classes": 3, "hidden_sizes": [8], "dropout": 0.0}, {}) == []
    assert [a for a, _ in MLP.check_args({"in_features": 0, "hidden_sizes": [-1], "dropout": 1.0}, {})] == [
        "in_features",
        "hidden_sizes",
        "dropout",
    ]
    gpt = {"vocab_size": 65, "block_size": 8, "n_layer": 2, "n_head": 3, "n_embd": 32, "dropout": 0.0}
    assert GPT.check_args(gpt, {}) == [("n_head", "n_embd (32) must be a multiple of n_head (3)")]
    assert GPT.check_args({**gpt, "n_head": 4, "n_layer": 10**6}, {})[0][0] == "n_layer"
    args = {"split": "val", "num_samples": 2**63, "num_features": 4, "num_classes": 3, "clusters_per_class": 1}
    found = SyntheticClassification.check_args({**args, "noise": 1.0, "separation": float("nan"), "seed": -1})
    assert [a for a, _ in found] == ["num_samples", "separation", "seed"]
    memmap = {"split": "train", "block_size": 8, "dtype": "U4", "val_fraction": 0.1, "vocab_size": None}
    memmap |= {"offsets": "fixed", "seed": 0}
    assert TokenMemmap.check_args(memmap) == [
        ("dtype", "expected a number dtype such as uint16 or int32, got a string ('U4')")
    ]


# ---------------------------------------------------------------------------------------------------- YAML's edges

QUICKSTART = REPO / "recipes" / "quickstart.yaml"


def recipe_file(folder: Path, text: str) -> Path:
    """A recipe of `text` on top of the quick start, in a folder of its own."""
    (folder / "recipe").mkdir()
    path = folder / "recipe" / "r.yaml"
    path.write_text(f"base: {QUICKSTART}\n{text}")
    return path


@pytest.mark.parametrize(
    ("tagged", "problem"),
    [
        ("!!float abc", "!!float cannot make a value of 'abc'"),
        ("!!int x", "!!int cannot make a value of 'x'"),
        ("!!timestamp bad", "!!timestamp cannot make a value of 'bad'"),
        ("!!bool maybe", "!!bool cannot make a value of 'maybe'"),
        ("!!binary x", "failed to decode base64 data"),
    ],
)
def test_an_explicit_tag_that_cannot_make_its_value_is_refused(tagged: str, problem: str, tmp_path: Path):
    in_file = refused_alike(recipe_file(tmp_path, f"optimizer:\n  lr: {tagged}\n"), work=tmp_path)
    assert len(in_file) == 1 and in_file[0].startswith(f"line 3, column 7: not valid YAML ({problem}"), in_file
    as_override = refused_alike(QUICKSTART, f"optimizer.lr={tagged}", work=tmp_path / "override")
    assert as_override[0].startswith(f"optimizer.lr: the override value '{tagged}' is not valid YAML ({problem}")


DEEP = 3500  # far past Python's recursion limit


@pytest.mark.parametrize(
    ("text", "key"),
    [
        (f"model:\n  extra: {'[' * DEEP}{']' * DEEP}\n", "model.extra"),
        (f"model:\n  extra: {'{a: ' * DEEP}1{'}' * DEEP}\n", "model.extra.a"),
    ],
    ids=["lists", "sections"],
)
def test_deep_nesting_is_refused(text: str, key: str, tmp_path: Path):
    assert refused_alike(recipe_file(tmp_path, text), work=tmp_path) == [
        f"{key}: nested more than 100 levels deep (line 3); a recipe needs a handful"
    ]
    value = text.split("extra: ", 1)[1].strip()
    assert refused_alike(QUICKSTART, f"model.extra={value}", work=tmp_path / "override") == [
        "model.extra: the override value is nested more than 100 levels deep; a recipe needs a handful"
    ]


def test_nesting_through_aliases_is_refused_where_it_is(tmp_path: Path):
    chain = "".join(f"  a{i}: &a{i} [*a{i - 1}]\n" for i in range(1, 120))
    refused = refused_alike(recipe_file(tmp_path, f"model:\n  a0: &a0 [1]\n{chain}"), work=tmp_path)
    assert refused == ["model.a119: nested more than 100 levels deep; a recipe needs a handful"]
    endless = refused_alike(QUICKSTART, "model.extra=&x [1, *x]", work=tmp_path / "endless")
    assert endless == ["model.extra: the override value is nested more than 100 levels deep; a recipe needs a handful"]


def test_the_nesting_limit_counts_from_the_top_of_the_recipe():
    assert parse_yaml("[" * 100 + "]" * 100) == parse_yaml("[" * 100 + "]" * 100)
    with pytest.raises(yaml.YAMLError, match="nested more than 100 levels deep"):
        parse_yaml("[" * 101 + "]" * 101)
    assert apply_overrides({}, ["a.b=" + "[" * 98 + "]" * 98], "r.yaml")[1] == []  # the top, a and b: 100
    assert apply_overrides({}, ["a.b=" + "[" * 99 + "]" * 99], "r.yaml")[1] == [
        "r.yaml: a.b: the override value is nested more than 100 levels deep; a recipe needs a handful"
    ]
    assert apply_overrides({}, ["x." * 150 + "y=1"], "r.yaml")[1] == [
        f"r.yaml: {('x.' * 150)[:57]}...: a path of 151 keys nests more than 100 levels deep"
    ]


def test_a_list_as_a_key_is_refused(tmp_path: Path):
    assert refused_alike(recipe_file(tmp_path, "? [a, b]\n: 1\n"), work=tmp_path) == [
        "line 2, column 3: not valid YAML (a key must be a name, got a list)"
    ]
    assert refused_alike(QUICKSTART, "model.x={? [a, b] : 1}", work=tmp_path / "override") == [
        "model.x: the override value '{? [a, b] : 1}' is not valid YAML (a key must be a name, got a list)"
    ]


def test_keys_that_are_not_names_are_refused_where_they_name_something(tmp_path: Path):
    text = "optimizer: {_component_: adam, lr: 0.003, 7: 1}\n1.5: x\nstrategy: {fsdp: {null: 1, true: 2}}\n"
    assert refused_alike(recipe_file(tmp_path, text), work=tmp_path) == [
        "1.5: a key must be a name (a string), got a number (1.5)",
        "optimizer.7: a key must be a name (a string), got a number (7)",
        "strategy.fsdp.null: a key must be a name (a string), got null",
        "strategy.fsdp.true: a key must be a name (a string), got a boolean (true)",
    ]
    as_override = refused_alike(QUICKSTART, "optimizer={_component_: adam, lr: 0.003, 7: 1}", work=tmp_path / "o")
    assert as_override == ["optimizer.7: a key must be a name (a string), got a number (7)"]


def test_keys_inside_an_arguments_value_are_the_components_business(tmp_path: Path):
    """A mapping given to a component as a value (labels by class id) is the component's to read."""
    (tmp_path / "labelled.py").write_text(
        "import torch\nclass Net(torch.nn.Linear):\n"
        "    def __init__(self, in_features, out_features, labels=None):\n"
        "        super().__init__(in_features, out_features)\n"
    )
    (tmp_path / "r.yaml").write_text(
        "model: {_component_: labelled.Net, in_features: 8, out_features: 2, labels: {0: cat, 1: dog}}\n"
        "data: {train: {_component_: synthetic_classification}}\n"
        "optimizer: {_component_: sgd, lr: 0.1}\ntrain: {max_steps: 1}\n"
    )
    assert load_recipe(tmp_path / "r.yaml").model.kwargs["labels"] == {0: "cat", 1: "dog"}


# ---------------------------------------------------------------------------------------------------- null sections

PARENT = """\
model: {_component_: mlp, hidden_sizes: [4]}
data: {train: {_component_: synthetic_classification}}
optimizer: {_component_: sgd, lr: 0.1}
scheduler: {_component_: cosine, warmup_steps: 2}
train: {max_steps: 5}
strategy: {timeout_s: 60}
checkpoint: {keep_last: 7}
"""


def test_null_drops_an_inherited_section_and_its_defaults_apply(tmp_path: Path):
    (tmp_path / "parent.yaml").write_text(PARENT)
    child = tmp_path / "child.yaml"
    child.write_text("base: parent.yaml\nstrategy: null\ncheckpoint: null\nscheduler: null\n")
    recipe = load_recipe(child)
    assert recipe.strategy == StrategyConfig() and recipe.checkpoint == CheckpointConfig()
    assert recipe.scheduler.target == "constant" and recipe.checkpoint.keep_last == 3
    assert load_recipe(tmp_path / "parent.yaml", ["strategy=null", "checkpoint=null", "scheduler=null"]) == (
        dataclasses.replace(recipe, name="parent", run_dir="runs/parent")
    )
    # train takes what validate takes: the recipe it would run, printed.
    code, printed, _ = cli_in_process(["train", str(child), "--print-recipe"], tmp_path)
    assert code == 0 and yaml.safe_load(printed)["strategy"]["timeout_s"] == 1800.0


def test_a_required_section_given_null_is_missing(tmp_path: Path):
    (tmp_path / "parent.yaml").write_text(PARENT)
    child = tmp_path / "child.yaml"
    child.write_text("base: parent.yaml\nmodel: null\ndata: {train: null}\n")
    assert refused_alike(child, work=tmp_path) == [
        "model: missing required value (null leaves a section unset)",
        "data.train: missing required value (null leaves a section unset)",
    ]
