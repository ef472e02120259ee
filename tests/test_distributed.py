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


def test_two_processes_train_one_run(tiny_recipe: Path, tmp_path: Path):
    run_dir = tmp_path / "run"
    proc = run_cli(
        "train", str(tiny_recipe), f"run_dir={run_dir}", launcher=accelerate_launch(2), timeout=TIMEOUT, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    env = json.loads((run_dir / "env.json").read_text())
    assert env["world_size"] == 2 and env["distributed_type"].endswith("MULTI_CPU")
    rows = read_metrics(run_dir)
    train_steps = [r["step"] for r in rows if "train/loss" in r]
    assert train_steps == list(range(1, 41))  # written once, by the main process, for every step
    # Each process sees half of each global batch of 2 x 32 samples.
    assert rows[0]["throughput/samples_per_s"] > 0
    assert proc.stdout.count("done at step 40/40") == 1
    assert (run_dir / "checkpoints" / "step_00000040" / "trainer_state.json").is_file()


def test_bad_recipe_under_two_processes_exits_2_on_every_rank(tiny_recipe: Path, tmp_path: Path):
    proc = run_cli(
        "train",
        str(tiny_recipe),
        f"run_dir={tmp_path / 'run'}",
        "optimizer.lr=-1",
        launcher=accelerate_launch(2),
        timeout=TIMEOUT,
        cwd=tmp_path,
    )
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: {tiny_recipe}: optimizer.lr: must be a number > 0, got -1"] * 2
    assert "Traceback" not in proc.stderr.split("error: ")[0] + "".join(errors)
    assert not (tmp_path / "run").exists()
