"""What training alone can find, refused so that the run dir is left as it was; a loss given as a function; the
folders a run writes, asked before it starts. In-process calls of the CLI: hundredths of a second each."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState
from conftest import read_metrics
from test_recipe_property import TINY

from launcher import cli, folders, losses
from launcher.components import Component
from launcher.errors import RecipeError

# A model that builds on the meta device (where `launcher validate` builds it) and refuses a real one: a stand-in
# for whatever only training can find.
ONLY_ON_META = """\
import torch


class OnlyOnMeta(torch.nn.Module):
    def __init__(self, in_features: int = 4, num_classes: int = 3):
        super().__init__()
        self.net = torch.nn.Linear(in_features, num_classes)
        if self.net.weight.device.type != "meta":
            raise ValueError("this model wants another machine")

    def forward(self, x):
        return self.net(x)
"""


def launcher(*args: str) -> tuple[int, str]:
    AcceleratorState._reset_state(reset_partial_state=True)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = cli.main(list(args))
    return code, err.getvalue()


def contents(folder: Path) -> dict[str, bytes] | None:
    if not folder.exists():
        return None
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else b"/" for p in folder.rglob("*")}


@pytest.fixture
def recipe(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    (tmp_path / "onlymeta.py").write_text(ONLY_ON_META)
    return path


@pytest.mark.parametrize("holds", [None, {}, {"notes.txt": b"mine"}], ids=["new", "empty", "the-user's-file"])
def test_a_run_refused_while_it_is_built_leaves_the_run_dir_as_it_found_it(recipe: Path, holds: dict | None):
    run_dir = recipe.parent / "deep" / "run"
    if holds is not None:
        run_dir.mkdir(parents=True)
        for name, data in holds.items():
            (run_dir / name).write_bytes(data)
    before = contents(recipe.parent / "deep")
    args = [str(recipe), f"run_dir={run_dir}", "model=onlymeta.OnlyOnMeta", "logging.trackers=[jsonl,tensorboard]"]
    assert launcher("validate", *args)[0] == 0  # the meta device builds it
    code, err = launcher("train", *args)
    assert code == 2 and "this model wants another machine" in err and err.startswith(f"error: {recipe}: model:"), err
    assert contents(recipe.parent / "deep") == before  # no lock file, no run dir made for it, nothing written


def test_a_loss_function_trains_and_is_scored_like_its_module(recipe: Path):
    run_dir = recipe.parent / "run"
    args = [str(recipe), f"run_dir={run_dir}", "loss=torch.nn.functional.cross_entropy"]
    assert launcher("train", *args)[0] == 0
    with_module = recipe.parent / "module"
    assert launcher("train", str(recipe), f"run_dir={with_module}", "loss=cross_entropy")[0] == 0
    # The same loss, the same accuracy: bit for bit, as both runs are made here.
    keys = ("step", "train/loss", "grad_norm", "val/loss", "val/accuracy")
    rows = [[{k: row.get(k) for k in keys} for row in read_metrics(d)] for d in (run_dir, with_module)]
    assert rows[0] == rows[1] and any("val/accuracy" in row for row in read_metrics(run_dir))


def test_a_loss_function_takes_the_recipe_arguments_and_evaluation_its_reduction():
    loss = losses.build(Component("torch.nn.functional.cross_entropy", {"label_smoothing": 0.1}))
    outputs, targets = torch.randn(5, 3), torch.tensor([0, 1, 2, 1, 0])
    want = torch.nn.functional.cross_entropy(outputs, targets, label_smoothing=0.1)
    assert torch.equal(loss(outputs, targets), want) and losses.classifies(loss)
    loss.reduction = "none"
    assert loss(outputs, targets).shape == (5,)
    assert not losses.classifies(losses.build(Component("torch.nn.functional.nll_loss")))
    assert isinstance(losses.build(Component("torch.nn.MSELoss")), torch.nn.MSELoss)  # a module, as before


@pytest.mark.parametrize(
    ("target", "kwargs", "line"),
    [
        ("os.getcwd", {}, "loss: os.getcwd gave a str, not a loss"),
        ("torch.nn.functional.cross_entropy", {"label_smoothing": "x"}, "loss.label_smoothing: "),
        ("json.dumps", {}, "loss: building json.dumps failed: TypeError"),
    ],
)
def test_what_is_not_a_loss_is_refused_in_one_line(target: str, kwargs: dict, line: str):
    with pytest.raises(RecipeError) as e:
        losses.build(Component(target, kwargs))
    assert len(e.value.problems) == 1 and e.value.problems[0].startswith(line), e.value.problems


def test_folders_a_run_cannot_make_or_write_are_named(tmp_path: Path):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    assert folders.problem("run_dir", tmp_path / "new" / "run") is None
    assert folders.problem("run_dir", tmp_path) is None
    assert folders.problem("run_dir", a_file) == f"run_dir: {a_file} is a file, not a folder"
    under = folders.problem("checkpoint.dir", a_file / "ckpt")
    assert under == f"checkpoint.dir: {a_file / 'ckpt'} lies under {a_file}, which is a file, not a folder"
    if Path("/proc/self").exists():  # Linux: nothing can be created in /proc
        assert "nothing can be created in /proc" in (folders.problem("run_dir", Path("/proc/launcher-run")) or "")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]  # the probes left nothing
