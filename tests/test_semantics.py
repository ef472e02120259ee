"""What N processes must get right that one process cannot get wrong, shown with real processes over gloo.

Most tests start each rank as its own `python -m launcher` process with RANK/WORLD_SIZE set, as torchrun or srun
would but without an agent that kills the others when one fails, so each rank's exit code and output can be read.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, TINY_RECIPE, finish, free_port, read_metrics, run_cli
from conftest import start_ranks as _start_ranks
from test_distributed import TIMEOUT, accelerate_launch

# Clipping at 0.05 is active on every step of this recipe (its gradient norms are around 0.5).
CLIPPED = ["train.clip_grad_norm=0.05", "logging.every_steps=1"]


def start_ranks(n: int, *args: str, cwd: Path) -> list[subprocess.Popen]:
    """The ranks, with a collective timeout short enough that a hang fails the test quickly with the run's own
    message (a test may give a shorter one)."""
    return _start_ranks(n, *args[:2], "strategy.timeout_s=60", *args[2:], cwd=cwd)


def state_at(run_dir: Path, step: int) -> dict:
    return json.loads((run_dir / "checkpoints" / f"step_{step:08d}" / "trainer_state.json").read_text())


def saved_rng_ranks(run_dir: Path, step: int) -> int:
    rng = torch.load(run_dir / "checkpoints" / f"step_{step:08d}" / "rng.pt", weights_only=True)
    return len(rng["ranks"])


def test_replicas_stay_bitwise_identical_with_clipping(tiny_recipe: Path, tmp_path: Path):
    procs = start_ranks(
        2,
        "train",
        str(tiny_recipe),
        f"run_dir={tmp_path / 'run'}",
        "train.max_steps=20",
        "checkpoint.every_steps=10",
        *CLIPPED,
        cwd=tmp_path,
    )
    results = finish(procs, TIMEOUT)
    assert [rc for rc, _, _ in results] == [0, 0], results
    for step in (10, 20):
        checksums = state_at(tmp_path / "run", step)["replica_checksums"]
        assert len(checksums) == 2 and checksums[0] == checksums[1]
    norms = [r["grad_norm"] for r in read_metrics(tmp_path / "run") if "grad_norm" in r]
    assert len(norms) == 20 and min(norms) > 0.05  # the logged norm is the one before clipping


def test_two_processes_match_one_process_accumulating_the_same_global_batch(tiny_recipe: Path, tmp_path: Path):
    # 2 ranks x batch 16 and 1 rank x batch 16 x 2 micro-batches see the same 32 samples per update, in the same
    # order. The loss and the gradient norm logged at each step must agree: a per-rank (unsynchronised) norm, or
    # a clip before the gradients are summed, would not.
    common = ["train.max_steps=20", "train.batch_size=16", *CLIPPED]
    procs = start_ranks(2, "train", str(tiny_recipe), f"run_dir={tmp_path / 'two'}", *common, cwd=tmp_path)
    assert [rc for rc, _, _ in finish(procs, TIMEOUT)] == [0, 0]
    one = run_cli(
        "train",
        str(tiny_recipe),
        f"run_dir={tmp_path / 'one'}",
        *common,
        "train.gradient_accumulation_steps=2",
        cwd=tmp_path,
    )
    assert one.returncode == 0, one.stderr

    def rows(name: str) -> dict[int, dict]:
        return {r["step"]: r for r in read_metrics(tmp_path / name) if "train/loss" in r}

    two_rows, one_rows = rows("two"), rows("one")
    assert sorted(two_rows) == sorted(one_rows) == list(range(1, 21))
    for step in range(1, 21):
        for key in ("train/loss", "grad_norm"):
            assert two_rows[step][key] == pytest.approx(one_rows[step][key], abs=1e-5), (step, key)


VAL_SHARDS = '''\
import torch
from torch.utils.data import Dataset


class Shards(Dataset):
    """Validation batches alternate between easy and hard samples, so with 2 ranks each rank's local metric
    (rank 0: the easy batches, rank 1: the hard ones) would tell another story than the global one."""

    def __init__(self, batch_size: int = 8, batches: int = 8):
        g = torch.Generator().manual_seed(0)
        xs, ys = [], []
        for b in range(batches):
            y = torch.randint(0, 3, (batch_size,), generator=g)
            noise = 0.1 if b % 2 == 0 else 5.0
            xs.append(torch.nn.functional.one_hot(y, 8).float() * 3 + noise * torch.randn(batch_size, 8, generator=g))
            ys.append(y)
        self.x, self.y = torch.cat(xs), torch.cat(ys)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]
'''


def test_early_stopping_stops_every_rank_at_the_same_step(tmp_path: Path):
    (tmp_path / "shards.py").write_text(VAL_SHARDS)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        TINY_RECIPE.replace(
            "  val: {split: val, num_samples: 256}",
            "  val: {_component_: shards.Shards}",
        )
    )
    procs = start_ranks(
        2,
        "train",
        str(recipe),
        f"run_dir={tmp_path / 'run'}",
        "train.max_steps=500",
        "eval.every_steps=4",
        "eval.batch_size=8",
        "early_stopping={monitor: val/loss, mode: min, patience: 2, min_delta: 0.05}",
        cwd=tmp_path,
    )
    results = finish(procs, TIMEOUT)
    assert [rc for rc, _, _ in results] == [0, 0], results
    out = results[0][1]
    assert "stopped (early stopping) at step" in out
    stop_step = int(out.split("stopped (early stopping) at step ")[1].split("/")[0])
    assert stop_step < 500
    # Both ranks took part in the final checkpoint at that step: each handed its RNG state to it.
    assert saved_rng_ranks(tmp_path / "run", stop_step) == 2
    assert len(set(state_at(tmp_path / "run", stop_step)["replica_checksums"])) == 1


NAN_MODEL = '''\
import torch
import torch.distributed as dist


class NaNOnRank1(torch.nn.Module):
    """A linear model whose training forward on rank 1 returns NaN from its `first`-th call to its `last`-th."""

    def __init__(self, in_features: int, num_classes: int, first: int, last: int):
        super().__init__()
        self.linear = torch.nn.Linear(in_features, num_classes)
        self.first, self.last, self.calls = first, last, 0

    def forward(self, x):
        out = self.linear(x)
        if self.training:
            self.calls += 1
            if dist.get_rank() == 1 and self.first <= self.calls <= self.last:
                out = out * float("nan")
        return out
'''


def nan_recipe(tmp_path: Path, first: int, last: int) -> Path:
    (tmp_path / "nanmodel.py").write_text(NAN_MODEL)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        TINY_RECIPE.replace(
            "model: {_component_: mlp, hidden_sizes: [32]}",
            f"model: {{_component_: nanmodel.NaNOnRank1, first: {first}, last: {last}}}",
        )
    )
    return recipe


def test_a_nan_on_one_rank_skips_that_step_on_every_rank(tmp_path: Path):
    recipe = nan_recipe(tmp_path, first=5, last=5)
    procs = start_ranks(
        2,
        "train",
        str(recipe),
        f"run_dir={tmp_path / 'run'}",
        "train.max_steps=12",
        "checkpoint.keep_last=5",
        "checkpoint.every_steps=4",
        cwd=tmp_path,
    )
    results = finish(procs, TIMEOUT)
    assert [rc for rc, _, _ in results] == [0, 0], results
    skipped = {r["step"]: r["train/skipped_steps"] for r in read_metrics(tmp_path / "run") if "train/loss" in r}
    assert [skipped[s] for s in range(1, 13)] == [0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1]
    # Said on the console once, by the main process alone.
    assert results[0][2].count("warning: step 5: update skipped: the loss or gradient norm is not finite") == 1
    assert "update skipped" not in results[1][2]
    # Had one rank applied step 5's update and the other not, their parameters would differ from then on.
    for step in (4, 8, 12):
        assert len(set(state_at(tmp_path / "run", step)["replica_checksums"])) == 1


def assert_diverged_at_step_8(results: list[tuple[int, str, str]]) -> None:
    """Both ranks stopped with exit 1 and one line: 3 updates in a row skipped by step 8, the last good state
    saved there."""
    assert [rc for rc, _, _ in results] == [1, 1], results
    message = results[0][2].strip().splitlines()[-1]
    assert message.startswith("error: stopped at step 8: 3 updates in a row had a non-finite loss or gradient norm")
    assert "train.max_nonfinite_steps=3" in message and "step_00000008" in message
    assert "Traceback" not in results[0][2] + results[1][2]


def test_consecutive_nans_stop_every_rank_with_the_last_good_state(tmp_path: Path):
    recipe = nan_recipe(tmp_path, first=6, last=10_000)
    procs = start_ranks(
        2,
        "train",
        str(recipe),
        f"run_dir={tmp_path / 'run'}",
        "train.max_steps=100",
        "train.max_nonfinite_steps=3",
        cwd=tmp_path,
    )
    assert_diverged_at_step_8(finish(procs, TIMEOUT))
    state = state_at(tmp_path / "run", 8)
    assert state["skipped_steps"] == 3 and len(set(state["replica_checksums"])) == 1


INF_LOSS = """\
import torch


class InfAtCalls(torch.nn.Module):
    \"\"\"Cross-entropy plus a constant infinity from the `first`-th call to the `last`-th: the loss is not finite
    while every gradient is.\"\"\"

    def __init__(self, first: int, last: int):
        super().__init__()
        self.first, self.last, self.calls = first, last, 0

    def forward(self, output, target):
        self.calls += 1
        bad = self.first <= self.calls <= self.last
        return torch.nn.functional.cross_entropy(output, target) + (float("inf") if bad else 0.0)
"""


def test_one_process_skips_an_update_whose_loss_is_not_finite_though_its_gradients_are(tmp_path: Path):
    (tmp_path / "infloss.py").write_text(INF_LOSS)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(TINY_RECIPE + "loss: {_component_: infloss.InfAtCalls, first: 3, last: 4}\n")
    run = run_cli("train", str(recipe), f"run_dir={tmp_path / 'run'}", "train.max_steps=6", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    skipped = {r["step"]: r["train/skipped_steps"] for r in read_metrics(tmp_path / "run") if "train/loss" in r}
    assert [skipped[s] for s in range(1, 7)] == [0, 0, 1, 2, 2, 2]
    # The first is said when it happens; the next, a moment later, is held back (at most one such line in 10 s).
    assert "warning: step 3: update skipped" in run.stderr and run.stderr.count("update skipped") == 1


def wait_for_step(run_dir: Path, step: int, procs: list[subprocess.Popen], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (run_dir / "metrics.jsonl").exists() and any(r["step"] >= step for r in read_metrics(run_dir)):
            return
        assert all(p.poll() is None for p in procs), "a rank exited early"
        time.sleep(0.2)
    raise AssertionError(f"no step {step} within {timeout} s")


LONG = ["train.max_steps=100000", "eval.every_steps=null", "checkpoint.every_steps=null", "logging.every_steps=5"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step(tiny_recipe: Path, tmp_path: Path, sig):
    run_dir = tmp_path / "run"
    # save_final off: a stop request saves all the same, so the run can be resumed.
    procs = start_ranks(
        2, "train", str(tiny_recipe), f"run_dir={run_dir}", *LONG, "checkpoint.save_final=false", cwd=tmp_path
    )
    wait_for_step(run_dir, 20, procs)
    procs[1].send_signal(sig)
    results = finish(procs, TIMEOUT)
    assert [rc for rc, _, _ in results] == [0, 0], results
    out = results[0][1]
    assert f"stopped ({sig.name}) at step" in out  # reported by rank 0, though rank 1 received it
    step = int(out.split(" at step ")[1].split("/")[0])
    assert saved_rng_ranks(run_dir, step) == 2
    assert len(set(state_at(run_dir, step)["replica_checksums"])) == 1


def test_the_wall_time_budget_stops_every_rank_together(tiny_recipe: Path, tmp_path: Path):
    procs = start_ranks(
        2, "train", str(tiny_recipe), f"run_dir={tmp_path / 'run'}", *LONG, "train.max_time_s=4", cwd=tmp_path
    )
    results = finish(procs, TIMEOUT)
    assert [rc for rc, _, _ in results] == [0, 0], results
    assert "stopped (max_time_s reached) at step" in results[0][1]


@pytest.mark.parametrize(
    ("sig", "timeout_s"),
    [(signal.SIGKILL, 20), (signal.SIGSTOP, 8)],  # a rank that died, and one that hangs (stopped, connection open)
)
def test_a_lost_rank_makes_the_other_exit_with_the_hang_message(tiny_recipe: Path, tmp_path: Path, sig, timeout_s):
    run_dir = tmp_path / "run"
    procs = start_ranks(
        2, "train", str(tiny_recipe), f"run_dir={run_dir}", *LONG, f"strategy.timeout_s={timeout_s}", cwd=tmp_path
    )
    try:
        wait_for_step(run_dir, 20, procs)
        procs[1].send_signal(sig)
        lost_at = time.monotonic()
        _, err = procs[0].communicate(timeout=timeout_s + 60)
        waited = time.monotonic() - lost_at
    finally:
        procs[1].kill()
        procs[1].wait()
    assert procs[0].returncode == 1, err
    assert waited < timeout_s + 30
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: rank 0: at step ") and ", gave up waiting for " in last, err
    assert f"strategy.timeout_s={timeout_s}" in last


def test_two_machine_ranks_on_localhost_train_together(tiny_recipe: Path, tmp_path: Path):
    port = free_port()
    launches = []
    for machine_rank in (0, 1):
        cmd = accelerate_launch(2)
        cmd[cmd.index("--num_machines") + 1] = "2"
        cmd[cmd.index("--main_process_port") + 1] = str(port)
        cmd[-2:-2] = ["--machine_rank", str(machine_rank), "--main_process_ip", "127.0.0.1"]
        args = ["train", str(tiny_recipe), f"run_dir={tmp_path / 'run'}", "logging.progress_bar=false"]
        launches.append(
            subprocess.Popen([*cmd, *args], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    results = finish(launches, TIMEOUT)
    assert [rc for rc, _, _ in results] == [0, 0], results
    env = json.loads((tmp_path / "run" / "env.json").read_text())
    assert env["world_size"] == 2
    assert "done at step 40/40" in results[0][1]
    assert len(set(state_at(tmp_path / "run", 40)["replica_checksums"])) == 1


def test_bf16_on_cpu_trains_the_quickstart_to_the_stated_accuracy(tmp_path: Path):
    from test_train import QUICKSTART_ACCURACY

    proc = run_cli("train", "recipes/quickstart.yaml", "train.mixed_precision=bf16", f"run_dir={tmp_path / 'run'}")
    assert proc.returncode == 0, proc.stderr
    final = [r for r in read_metrics(tmp_path / "run") if "val/accuracy" in r][-1]
    assert final["val/accuracy"] >= QUICKSTART_ACCURACY
    assert json.loads((tmp_path / "run" / "env.json").read_text())["mixed_precision"] == "bf16"


def test_world_size_without_a_launcher_is_refused(tiny_recipe: Path, tmp_path: Path):
    proc = subprocess.run(
        [sys.executable, "-m", "launcher", "train", str(tiny_recipe), f"run_dir={tmp_path / 'run'}"],
        env={**__import__("os").environ, "WORLD_SIZE": "2", "RANK": "0"},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"error: {tiny_recipe}: launch: WORLD_SIZE=2 is set but LOCAL_RANK is not, so each process would train "
        "alone; start the processes with accelerate launch or torchrun, or give each RANK, LOCAL_RANK, MASTER_ADDR "
        "and MASTER_PORT"
    )
    assert not (tmp_path / "run").exists()


def test_launch_flags_that_contradict_the_recipe_are_refused(tiny_recipe: Path, tmp_path: Path):
    cmd = accelerate_launch(2)
    cmd[cmd.index("--mixed_precision") + 1] = "bf16"
    proc = run_cli(
        "train", str(tiny_recipe), f"run_dir={tmp_path / 'run'}", launcher=cmd, timeout=TIMEOUT, cwd=tmp_path
    )
    assert proc.returncode != 0
    errors = {line for line in proc.stderr.splitlines() if line.startswith("error: ")}
    assert errors == {
        f"error: {tiny_recipe}: train.mixed_precision: the recipe says no but accelerate launch says bf16; "
        "drop --mixed_precision or make them agree"
    }
    assert not (tmp_path / "run").exists()


UNEVEN = """\
import os

from launcher.data.synthetic import SyntheticClassification


def uneven(split: str = "val"):
    \"\"\"A validation set that shards itself unevenly: rank 1 gets twice rank 0's samples.\"\"\"
    rank = int(os.environ.get("RANK", "0"))
    return SyntheticClassification(split=split, num_samples=64 * (rank + 1), num_features=8, num_classes=3)
"""


def test_validation_sets_of_different_lengths_are_refused_before_the_first_step(tmp_path: Path):
    (tmp_path / "uneven.py").write_text(UNEVEN)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(TINY_RECIPE.replace("val: {split: val, num_samples: 256}", "val: {_component_: uneven.uneven}"))
    run_dir = tmp_path / "run"
    procs = start_ranks(2, "train", str(recipe), f"run_dir={run_dir}", "strategy.timeout_s=600", cwd=tmp_path)
    results = finish(procs, 120)  # far less than the timeout: nobody waits for it
    assert [rc for rc, _, _ in results] == [2, 2], results
    lines = results[0][2].strip().splitlines()
    assert lines[-1].startswith(
        "error: data.val: the processes have different numbers of batches (rank 0: 1, rank 1: 2)"
    )
    assert results[1][2].strip() == ""
    assert not (run_dir / "metrics.jsonl").exists() and not (run_dir / "checkpoints").exists()
