"""`launcher plan`: its arithmetic, and that it agrees with what a run does."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import REPO, read_metrics, run_cli

from launcher.plan import make_plan, total_steps
from launcher.recipe import load_recipe


@pytest.mark.parametrize(
    ("samples", "processes", "accumulate", "drop_last", "batches", "steps_per_epoch"),
    [
        (512, 1, 1, False, 16, 16),
        (512, 2, 1, False, 8, 8),
        (520, 2, 1, False, 9, 9),  # the last batch is padded so every process has 9
        (520, 2, 1, True, 8, 8),
        (512, 2, 3, False, 8, 3),  # the epoch's last update takes the 2 batches left
    ],
)
def test_batches_and_updates_per_epoch(
    tiny_recipe: Path, samples, processes, accumulate, drop_last, batches, steps_per_epoch
):
    recipe = load_recipe(
        tiny_recipe, [f"train.gradient_accumulation_steps={accumulate}", f"data.drop_last={str(drop_last).lower()}"]
    )
    plan = make_plan(recipe, samples, processes)
    assert (plan.batches_per_process, plan.steps_per_epoch) == (batches, steps_per_epoch)
    assert plan.global_batch == 32 * processes * accumulate


def test_the_first_limit_reached_ends_the_run():
    assert total_steps(10, max_steps=25, max_epochs=None) == 25
    assert total_steps(10, max_steps=None, max_epochs=2) == 20
    assert total_steps(10, max_steps=25, max_epochs=2) == 20


def test_plan_agrees_with_the_run(tiny_recipe: Path, tmp_path: Path):
    overrides = ["train.max_steps=null", "train.max_epochs=3", "train.gradient_accumulation_steps=3"]
    planned = run_cli("plan", str(tiny_recipe), *overrides)
    assert planned.returncode == 0, planned.stderr
    assert "run           18 updates = 3.00 epochs" in planned.stdout  # 16 batches make 6 updates an epoch
    ran = run_cli("train", str(tiny_recipe), *overrides, f"run_dir={tmp_path / 'run'}")
    assert ran.returncode == 0, ran.stderr
    assert read_metrics(tmp_path / "run")[-1]["step"] == 18


def test_plan_draws_the_schedule():
    proc = run_cli("plan", str(REPO / "recipes" / "quickstart.yaml"), "--processes", "2")
    assert proc.returncode == 0, proc.stderr
    assert "64 per process x 2 processes x 1 accumulated = 128 samples per update" in proc.stdout
    assert "learning rate cosine: " in proc.stdout and "0.0003 at 51" in proc.stdout


def test_plan_of_the_zero3_recipe_shows_strategy_memory_and_deepspeed_config(tmp_path: Path):
    # Run where the recipe's data files do not exist: the plan still comes, from train.max_steps.
    proc = run_cli("plan", str(REPO / "recipes" / "gpt_zero3.yaml"), "--processes", "8", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "world size    8 processes" in out
    assert "batch         16 per process x 8 processes x 4 accumulated = 512 samples per update" in out
    assert "tokens        1024 per sample = 524,288 per update" in out
    assert "run           20000 updates (train.max_steps)" in out
    assert "strategy      deepspeed ZeRO-3" in out
    assert "parameters    124,373,760" in out
    # ZeRO-3, bf16, AdamW over 8 processes: (2 + 2 + 12) bytes x 124M / 8.
    assert "= 0.23 GiB" in out.split("memory")[1].splitlines()[0]
    assert '"train_batch_size": 512' in out and '"stage": 3' in out and '"gradient_clipping": 1.0' in out
    # ZeRO-3's buckets and persistence threshold sized to GPT-2 small's width (768), as "auto" would be.
    assert '"reduce_bucket_size": 589824' in out and '"stage3_prefetch_bucket_size": 530841' in out
    assert '"stage3_param_persistence_threshold": 7680' in out and '"overlap_comm": true' in out
    assert "learning rate cosine: " in out and "0.0006 at 701" in out
    # Activations of one micro-batch (16 x 1024 tokens), measured on the meta device: recomputing the 12 blocks
    # keeps their inputs and one block's activations instead of all of them.
    line = out.split("activations   per process, one micro-batch of 16")[1].splitlines()[1]
    none, full = (float(x) for x in re.findall(r"(?:none|full) ([\d.]+) GiB", line))
    assert 1 < full < none / 2, line


def test_activation_memory_is_what_a_real_forward_saves_and_recomputing_keeps_less():
    import torch
    from torch import nn

    from launcher.activations import Saved, measure
    from launcher.batches import compute_loss
    from launcher.models.gpt import GPT

    def saved(device: str) -> Saved:
        torch.manual_seed(0)
        with torch.device(device):
            model = GPT(vocab_size=64, block_size=128, n_layer=3, n_head=4, n_embd=32)
            idx = torch.zeros(2, 128, dtype=torch.long)
        return measure(model, list(model.blocks), lambda: compute_loss(nn.CrossEntropyLoss(), model(idx), idx))

    on_meta = saved("meta")
    assert on_meta == saved("cpu")  # the meta device stands for a real forward (with a fused attention kernel)
    assert on_meta.inputs == (2 * 128 * 32 * 4,) * 3  # each block's input: (batch, time, width) in fp32
    none, full = on_meta.kept([False] * 3), on_meta.kept([True] * 3)
    assert none == on_meta.outside + sum(on_meta.blocks)
    assert full == on_meta.outside + sum(on_meta.inputs) + max(on_meta.blocks) < none
    assert full < on_meta.kept([True, False, True]) < none
