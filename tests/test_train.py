"""Whole runs through the CLI in a subprocess, as a user starts them, checked through the files they leave."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import SHAKESPEARE, TINY_RECIPE, read_metrics, run_cli

from launcher import checkpoint

QUICKSTART_ACCURACY = 0.88  # the accuracy README promises for recipes/quickstart.yaml


def test_quickstart_reaches_the_stated_accuracy_and_leaves_its_files(tmp_path: Path):
    run_dir = tmp_path / "qs"
    proc = run_cli("train", "recipes/quickstart.yaml", f"run_dir={run_dir}")
    assert proc.returncode == 0, proc.stderr
    rows = read_metrics(run_dir)
    final_eval = [r for r in rows if "val/accuracy" in r][-1]
    assert final_eval["val/accuracy"] >= QUICKSTART_ACCURACY
    train_rows = [r for r in rows if "train/loss" in r]
    assert {"train/loss", "lr", "grad_norm", "epoch", "throughput/samples_per_s"} <= set(train_rows[-1])
    assert train_rows[-1]["train/loss"] < train_rows[0]["train/loss"]
    assert list(run_dir.glob("tensorboard/**/events.out.tfevents.*"))
    saved = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    assert saved["optimizer"] == {"_component_": "adam", "lr": 3e-4}
    env = json.loads((run_dir / "env.json").read_text())
    assert env["world_size"] == 1 and env["torch"] and env["accelerate"]
    best = checkpoint.best(run_dir / "checkpoints")
    best_monitor = json.loads((best / "trainer_state.json").read_text())["monitor"]
    assert best_monitor["value"] == max(r["val/accuracy"] for r in rows if "val/accuracy" in r)
    assert len(checkpoint.complete_steps(run_dir / "checkpoints")) <= 3  # keep_last: 2, keep_best: 1
    assert f"val/accuracy {final_eval['val/accuracy']:.4f}" in proc.stdout


def test_overrides_reach_the_printed_and_the_saved_recipe(tmp_path: Path):
    overrides = ["optimizer.lr=1e-3", "train.max_steps=50", "train.peak_flops=2e9", f"run_dir={tmp_path / 'run'}"]
    printed = run_cli("train", "recipes/quickstart.yaml", *overrides, "--print-recipe")
    assert printed.returncode == 0, printed.stderr
    resolved = yaml.safe_load(printed.stdout)
    assert resolved["optimizer"]["lr"] == 1e-3 and resolved["train"]["max_steps"] == 50
    assert not (tmp_path / "run").exists()  # printing trains nothing

    proc = run_cli("train", "recipes/quickstart.yaml", *overrides)
    assert proc.returncode == 0, proc.stderr
    saved = yaml.safe_load((tmp_path / "run" / "recipe.yaml").read_text())
    assert saved == resolved
    rows = read_metrics(tmp_path / "run")
    assert rows[-1]["step"] == 50
    # The rows show the rates their updates used: the warm-up's peak (1e-3) may fall between two logged rows.
    assert max(r["lr"] for r in rows if "lr" in r) == pytest.approx(1e-3, rel=0.05)
    # Every log row carries the model's FLOP rate, its utilisation of the peak given, and the peak memory.
    logged = [r for r in rows if "train/loss" in r]
    assert all(r["flops_per_s"] > 0 and r["memory/peak_gib"] > 0 for r in logged)
    assert all(r["mfu"] == pytest.approx(r["flops_per_s"] / 2e9) for r in logged)
    env = json.loads((tmp_path / "run" / "env.json").read_text())
    assert env["flops_per_update"] > 0 and env["peak_flops"] == 2e9


def test_a_model_from_a_module_beside_the_recipe_trains(tmp_path: Path):
    recipes = tmp_path / "myproject"
    recipes.mkdir()
    (recipes / "mymodels.py").write_text(
        "import torch\n\n\n"
        "class TinyNet(torch.nn.Module):\n"
        "    def __init__(self, in_features: int, num_classes: int, width: int = 16):\n"
        "        super().__init__()\n"
        "        self.body = torch.nn.Sequential(torch.nn.Linear(in_features, width), torch.nn.ReLU(),\n"
        "                                        torch.nn.Linear(width, num_classes))\n\n"
        "    def forward(self, x):\n"
        "        return self.body(x)\n"
    )
    recipe = TINY_RECIPE.replace(
        "model: {_component_: mlp, hidden_sizes: [32]}", "model: {_component_: mymodels.TinyNet, width: 24}"
    )
    (recipes / "mine.yaml").write_text(recipe)
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    proc = run_cli("train", str(recipes / "mine.yaml"), "run_dir=out", cwd=elsewhere)
    assert proc.returncode == 0, proc.stderr
    assert read_metrics(elsewhere / "out")[-1]["step"] == 40
    assert "mymodels.TinyNet" in (elsewhere / "out" / "recipe.yaml").read_text()


def test_an_existing_run_is_never_overwritten(tiny_recipe: Path, tmp_path: Path):
    run_dir = tmp_path / "run"
    assert run_cli("train", str(tiny_recipe), f"run_dir={run_dir}").returncode == 0
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    proc = run_cli("train", str(tiny_recipe), f"run_dir={run_dir}")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: {tiny_recipe}: run_dir: {run_dir} already holds a run; continue it with resume=auto, "
        "or start a new one with run_dir=<another folder>"
    ]
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


def test_resume_continues_the_same_run(tmp_path: Path):
    # Dropout and a shuffled loader make the comparison exact only if RNG and data order are restored; 40 steps is
    # in the middle of an epoch (16 steps each).
    recipe = tmp_path / "r.yaml"
    recipe.write_text(TINY_RECIPE.replace("hidden_sizes: [32]}", "hidden_sizes: [32], dropout: 0.2}"))
    full, parts = tmp_path / "full", tmp_path / "parts"
    assert run_cli("train", str(recipe), f"run_dir={full}", "train.max_steps=60").returncode == 0
    assert run_cli("train", str(recipe), f"run_dir={parts}", "train.max_steps=40").returncode == 0
    proc = run_cli("train", str(recipe), f"run_dir={parts}", "train.max_steps=60", "resume=auto")
    assert proc.returncode == 0, proc.stderr
    assert "resumed from" in proc.stdout and "step_00000040" in proc.stdout

    def losses(run_dir: Path) -> dict[int, float]:
        return {r["step"]: r["train/loss"] for r in read_metrics(run_dir) if "train/loss" in r}

    full_losses, part_losses = losses(full), losses(parts)
    assert sorted(part_losses) == list(range(1, 61))
    for step in range(41, 61):
        assert part_losses[step] == pytest.approx(full_losses[step], rel=1e-6, abs=1e-7), step


def test_early_stopping_stops_every_rank_at_the_verdict(tiny_recipe: Path, tmp_path: Path):
    # Watching val/loss for a *rise* never sees an improvement after the first evaluation: with patience 2 and an
    # evaluation every 5 steps, the run stops at step 15.
    run_dir = tmp_path / "run"
    proc = run_cli(
        "train",
        str(tiny_recipe),
        f"run_dir={run_dir}",
        "train.max_steps=200",
        "eval.every_steps=5",
        "early_stopping={monitor: val/loss, mode: max, patience: 2}",
    )
    assert proc.returncode == 0, proc.stderr
    assert "stopped (early stopping) at step 15/200" in proc.stdout
    assert read_metrics(run_dir)[-1]["step"] == 15
    assert (run_dir / "checkpoints" / "step_00000015").is_dir()


@pytest.mark.skipif(not SHAKESPEARE.is_file(), reason=f"needs {SHAKESPEARE}")
def test_charlm_learns_tiny_shakespeare(tmp_path: Path):
    run_dir = tmp_path / "charlm"
    proc = run_cli(
        "train",
        "recipes/charlm.yaml",
        f"data.dataset.path={SHAKESPEARE}",
        "train.max_steps=80",
        "eval.every_steps=40",
        "eval.max_batches=5",
        "logging.every_steps=10",
        f"run_dir={run_dir}",
    )
    assert proc.returncode == 0, proc.stderr
    rows = read_metrics(run_dir)
    val = [r["val/loss"] for r in rows if "val/loss" in r]
    # A uniform guess over Tiny Shakespeare's 65 characters costs ln(65) = 4.17 nats.
    assert val[-1] < 3.0
    assert any("throughput/tokens_per_s" in r for r in rows)


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is refused only where there is no CUDA GPU")
def test_fp16_without_a_gpu_is_refused_before_anything_is_written(tiny_recipe: Path, tmp_path: Path):
    proc = run_cli("train", str(tiny_recipe), f"run_dir={tmp_path / 'run'}", "train.mixed_precision=fp16")
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"error: {tiny_recipe}: train.mixed_precision: fp16 needs a CUDA GPU; use bf16 or no on CPU"
    )
    assert not (tmp_path / "run").exists()


def test_retention_leaves_exactly_the_newest_and_the_best(tiny_recipe: Path, tmp_path: Path):
    run_dir = tmp_path / "run"
    proc = run_cli(
        "train",
        str(tiny_recipe),
        f"run_dir={run_dir}",
        "eval.every_steps=4",
        "checkpoint={every_steps: 4, keep_last: 2, keep_best: 1, monitor: val/loss, mode: min}",
    )
    assert proc.returncode == 0, proc.stderr
    evals = [(r["val/loss"], r["step"]) for r in read_metrics(run_dir) if "val/loss" in r]
    assert len(evals) == 10  # and as many checkpoints were written, one every 4 of the 40 steps
    best_step = min(evals)[1]
    expected = {checkpoint.step_dir_name(s) for s in (36, 40, best_step)}
    assert {p.name for p in (run_dir / "checkpoints").iterdir()} == expected
    assert checkpoint.resolve(run_dir / "checkpoints" / "best").name == checkpoint.step_dir_name(best_step)


FEW = """\
import torch
from torch.utils.data import Dataset


class Few(Dataset):
    \"\"\"Five samples, whatever the recipe says: the launcher cannot know its length before building it.\"\"\"

    def __init__(self, split: str = "train"):
        self.x, self.y = torch.randn(5, 8), torch.randint(0, 3, (5,))

    def __len__(self) -> int:
        return 5

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]
"""


def test_a_train_set_that_fills_no_batch_is_refused_instead_of_looping(tmp_path: Path):
    (tmp_path / "few.py").write_text(FEW)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "model: {_component_: mlp, in_features: 8, num_classes: 3, hidden_sizes: [8]}\n"
        "data: {train: {_component_: few.Few}, drop_last: true}\n"
        "optimizer: {_component_: adam, lr: 0.003}\n"
        "train: {max_epochs: 1, batch_size: 32}\n"
        "logging: {trackers: [jsonl], progress_bar: false}\n"
    )
    proc = run_cli("train", str(recipe), f"run_dir={tmp_path / 'run'}", cwd=tmp_path, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: data.train: no batch to train on (fewer samples per process than train.batch_size with "
        "data.drop_last); give more samples, a smaller batch_size or drop_last=false"
    ]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
