"""Two real processes over gloo on CPU, started by `accelerate launch` as users start them."""

from __future__ import annotations

import json
import shutil
import socket
import sys
from pathlib import Path

from conftest import read_metrics, run_cli

TIMEOUT = 180  # a hung collective fails the test instead of stalling the suite


def accelerate_launch(num_processes: int) -> list[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    accelerate = shutil.which("accelerate") or f"{Path(sys.executable).parent}/accelerate"
    return [
        accelerate,
        "launch",
        "--multi_gpu",  # on a machine without GPUs this still starts N processes; the loop picks gloo on CPU
        "--num_processes",
        str(num_processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(port),
        "-m",
        "launcher",
    ]


def train_on_two(recipe: Path, tmp_path: Path, *overrides: str):
    return run_cli(
        "train",
        str(recipe),
        f"run_dir={tmp_path / 'run'}",
        *overrides,
        launcher=accelerate_launch(2),
        timeout=TIMEOUT,
        cwd=tmp_path,
    )


def refusals(proc) -> set[str]:
    """The distinct `error:` lines of a launch that every rank refused, after checking it failed cleanly: exit 2
    on the rank the launcher saw first, no traceback, no abort. The first rank to exit makes the launcher stop the
    other, which may not have printed yet, so the lines are compared as a set."""
    assert proc.returncode != 0
    assert "exitcode  : 2" in proc.stderr and "SIGABRT" not in proc.stderr and "Signal 6" not in proc.stderr
    assert "[rank0]: Traceback" not in proc.stderr and "[rank1]: Traceback" not in proc.stderr
    return {line for line in proc.stderr.splitlines() if line.startswith("error: ")}


def test_two_processes_train_one_run(tiny_recipe: Path, tmp_path: Path):
    run_dir = tmp_path / "run"
    proc = train_on_two(tiny_recipe, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    env = json.loads((run_dir / "env.json").read_text())
    assert env["world_size"] == 2 and env["distributed_type"].endswith("MULTI_CPU")
    rows = read_metrics(run_dir)
    train_steps = [r["step"] for r in rows if "train/loss" in r]
    assert train_steps == list(range(1, 41))  # written once, by the main process, for every step
    assert rows[0]["throughput/samples_per_s"] > 0
    assert all(r["flops_per_s"] > 0 and r["memory/peak_gib"] > 0 for r in rows if "train/loss" in r)
    # The MLP 8-32-3 on 32 samples a process: 2 FLOPs a weight forward, 4 backward (the first layer's input needs
    # no gradient: 2), counted by torch on the first update.
    assert env["flops_per_update"] == 32 * (6 * 32 * 3 + 4 * 8 * 32)
    assert proc.stdout.count("done at step 40/40") == 1
    assert (run_dir / "checkpoints" / "step_00000040" / "trainer_state.json").is_file()


def test_bad_recipe_under_two_processes_exits_2_on_every_rank(tiny_recipe: Path, tmp_path: Path):
    proc = train_on_two(tiny_recipe, tmp_path, "optimizer.lr=-1")
    assert refusals(proc) == {f"error: {tiny_recipe}: optimizer.lr: must be a number > 0, got a number (-1)"}
    assert not (tmp_path / "run").exists()


REFUSING_DATASET = """
class Refusing:
    def __init__(self, split: str, num_samples: int):
        raise ValueError(f"refusing to build the {split} split")
"""


def test_a_component_failing_to_build_on_every_rank_exits_cleanly(tiny_recipe: Path, tmp_path: Path):
    # The user's own dataset refuses its arguments only when built (validation checks the built-in ones before),
    # once the process group is up: each rank must report it and leave with exit code 2, not hang in a collective.
    (tiny_recipe.parent / "refusing.py").write_text(REFUSING_DATASET)
    proc = train_on_two(tiny_recipe, tmp_path, "data.train._component_=refusing.Refusing")
    (error,) = refusals(proc)
    assert error.startswith(f"error: {tiny_recipe}: data.train: building refusing.Refusing")
    assert "ValueError: refusing to build the train split" in error
