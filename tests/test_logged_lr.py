"""The learning rates a run logs are those its optimizer stepped with: each row's `lr` (the default groups') and
`lr/<name>` (each of `optimizer.groups`) are the rates of the row's own update, the first and the last included,
in a fresh run and in a resumed one. Runs go through `launcher.cli.main` in this process, so that a step hook sees
the real optimizer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import TINY_RECIPE, read_metrics
from torch.optim.optimizer import register_optimizer_step_pre_hook

from launcher import cli

STEPS = 8
SCHEDULE = ["scheduler._component_=cosine", "scheduler.warmup_steps=3", f"train.max_steps={STEPS}"]
# The rule splits each group in two (decaying, not decaying), empty halves left out: [head], [net.0.weight],
# [net.0.bias], and the default groups' [net.3.bias] (no decay).
GROUPS = [
    "optimizer._component_=adamw",
    "optimizer.weight_decay=0.1",
    "optimizer.groups=[{params: 'net.3.weight', lr: 0.01, name: head}, {params: 'net.0.*', lr: 0.002}]",
]


def train(tmp_path: Path, run_dir: str, *overrides: str) -> tuple[list[dict], list[list[float]]]:
    """The train rows of a run of the tiny recipe, and each param group's rate at every optimizer step."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # each run builds its own Accelerator
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(TINY_RECIPE)
    stepped: list[tuple[torch.optim.Optimizer, list[float]]] = []

    def record(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        stepped.append((optimizer, [float(group["lr"]) for group in optimizer.param_groups]))

    hook = register_optimizer_step_pre_hook(record)
    try:
        code = cli.main(["train", str(recipe), f"run_dir={tmp_path / run_dir}", *SCHEDULE, *overrides])
    finally:
        hook.remove()
    assert code == 0
    # The training's optimizer steps last (the recipe's check steps one of its own on a toy model first).
    lrs = [lrs for optimizer, lrs in stepped if optimizer is stepped[-1][0]]
    return [r for r in read_metrics(tmp_path / run_dir) if "train/loss" in r], lrs


def test_lr_is_the_rate_each_update_used(tmp_path: Path):
    rows, stepped = train(tmp_path, "run")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1)) and len(stepped) == STEPS
    assert [r["lr"] for r in rows] == [lrs[0] for lrs in stepped]
    assert rows[0]["lr"] == pytest.approx(0.003 / 4)  # the warm-up's first update: 1/(warmup_steps + 1)
    assert rows[-1]["lr"] > 0.0  # the last update's rate, not the one after the run's end
    assert not any(key.startswith("lr/") for key in rows[0])


def test_each_named_group_logs_its_rate_and_lr_is_the_default_groups(tmp_path: Path):
    rows, stepped = train(tmp_path, "run", *GROUPS)
    assert len(stepped) == STEPS and len(stepped[0]) == 4
    assert [key for key in rows[0] if key.startswith("lr")] == ["lr", "lr/head", "lr/group1"]
    for row, lrs in zip(rows, stepped, strict=True):
        assert (row["lr/head"], row["lr/group1"], row["lr"]) == (lrs[0], lrs[1], lrs[3])
    assert rows[3]["lr/head"] == 0.01 and rows[3]["lr/group1"] == 0.002 and rows[3]["lr"] == 0.003  # the peak


def test_a_resumed_run_logs_the_rates_it_steps_with(tmp_path: Path):
    whole, _ = train(tmp_path, "whole", *GROUPS, "checkpoint.every_steps=4")
    rows, stepped = train(
        tmp_path, "resumed", *GROUPS, f"resume={tmp_path / 'whole' / 'checkpoints' / 'step_00000004'}"
    )
    assert [r["step"] for r in rows] == list(range(5, STEPS + 1))
    for row, lrs in zip(rows, stepped, strict=True):
        assert (row["lr/head"], row["lr/group1"], row["lr"]) == (lrs[0], lrs[1], lrs[3])
    assert [r["lr"] for r in rows] == [r["lr"] for r in whole[4:]]


def test_a_warm_up_from_zero_starts_the_run_at_zero(tmp_path: Path):
    rows, stepped = train(tmp_path, "run", "scheduler.warmup_start=zero")
    assert [r["lr"] for r in rows] == [lrs[0] for lrs in stepped]
    assert [r["lr"] for r in rows[:4]] == pytest.approx([0.0, 0.001, 0.002, 0.003])  # the peak at update 4
