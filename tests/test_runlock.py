"""One run per run dir: two runs started at the same moment on one run dir (one process or two each), exactly one
trains and the other exits 2 naming the holder, touching nothing; a lock left by a SIGKILLed run blocks nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY_RECIPE, finish, read_metrics, start_ranks
from test_distributed import TIMEOUT

from launcher import checkpoint

# Long enough that the second run starts while the first still holds the run dir.
RUN = ["train.max_steps=300", "checkpoint.every_steps=100", "logging.every_steps=10", "strategy.timeout_s=60"]
IN_USE = "is in use by a run on host"


def _one_process(recipe: Path, run_dir: Path, *overrides: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "launcher", "train", str(recipe), f"run_dir={run_dir}", *RUN, *overrides]
    return subprocess.Popen(cmd, cwd=recipe.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _files(run_dir: Path) -> set[str]:
    return {str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file() and "events.out" not in p.name}


@pytest.fixture
def recipe(tmp_path: Path) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(TINY_RECIPE)
    return path


@pytest.mark.slow
def test_two_one_process_runs_on_one_run_dir_one_trains_the_other_is_refused(recipe: Path, tmp_path: Path):
    alone = tmp_path / "alone"
    assert finish([_one_process(recipe, alone)], TIMEOUT)[0][0] == 0
    shared = tmp_path / "shared"
    results = finish([_one_process(recipe, shared), _one_process(recipe, shared)], TIMEOUT)
    codes = sorted(rc for rc, _, _ in results)
    assert codes == [0, 2], results
    loser = next(r for r in results if r[0] == 2)
    lines = loser[2].strip().splitlines()
    assert len(lines) == 1 and IN_USE in lines[0] and "pid " in lines[0], loser[2]
    # The winner's files are those of a run that ran alone, and its history has one attempt.
    assert _files(shared) == _files(alone)
    assert [r.get("train/loss") for r in read_metrics(shared)] == [r.get("train/loss") for r in read_metrics(alone)]
    final = Path("checkpoints") / checkpoint.step_dir_name(300) / "model.safetensors"
    assert (shared / final).read_bytes() == (alone / final).read_bytes()
    assert [row.split('"')[3] for row in (shared / "history.jsonl").read_text().splitlines()] == ["start", "end"]


@pytest.mark.slow
def test_two_two_process_launches_on_one_run_dir_one_trains_the_other_exits_2(recipe: Path, tmp_path: Path):
    shared = tmp_path / "shared"
    args = ("train", str(recipe), f"run_dir={shared}", *RUN)
    launches = [start_ranks(2, *args, cwd=tmp_path), start_ranks(2, *args, cwd=tmp_path)]
    results = [finish(procs, TIMEOUT) for procs in launches]
    codes = sorted([rc for rc, _, _ in r] for r in results)
    assert codes == [[0, 0], [2, 2]], "\n".join(f"exit {rc}: {err}" for r in results for rc, _, err in r)
    loser = next(r for r in results if r[0][0] == 2)
    assert IN_USE in loser[0][2] and "Traceback" not in loser[0][2] + loser[1][2]
    assert [row.split('"')[3] for row in (shared / "history.jsonl").read_text().splitlines()] == ["start", "end"]
    assert checkpoint.complete_steps(shared / "checkpoints") == [200, 300]


@pytest.mark.slow
def test_a_lock_left_by_a_killed_run_does_not_block_the_next(recipe: Path, tmp_path: Path):
    run_dir = tmp_path / "run"
    proc = _one_process(recipe, run_dir, "train.max_steps=100000")
    ckpts = run_dir / "checkpoints"
    while not checkpoint.complete_steps(ckpts):
        assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    resumed = finish([_one_process(recipe, run_dir, "train.max_steps=150", "resume=auto")], TIMEOUT)
    assert resumed[0][0] == 0, resumed


@pytest.mark.slow
def test_a_refusal_only_one_rank_sees_is_agreed_and_every_rank_exits_2_at_once(recipe: Path, tmp_path: Path):
    # Rank 1 looks at a run dir that holds a run, rank 0 at a fresh one: as when another run writes its first files
    # between the two processes' looks. Neither may wait for the other until the timeout.
    held = tmp_path / "held"
    assert finish([_one_process(recipe, held, "train.max_steps=2")], TIMEOUT)[0][0] == 0
    fresh = tmp_path / "fresh"
    procs = start_ranks(
        2,
        "train",
        str(recipe),
        *RUN,
        "strategy.timeout_s=600",
        cwd=tmp_path,
        per_rank=[[f"run_dir={fresh}"], [f"run_dir={held}"]],
    )
    results = finish(procs, 120)  # far less than the timeout
    assert [rc for rc, _, _ in results] == [2, 2], results
    assert (
        results[1][2]
        .strip()
        .endswith(
            f"run_dir: {held} already holds a run; continue it with resume=auto, "
            "or start a new one with run_dir=<another folder>"
        )
    )
    assert results[0][2].strip() == ""
    assert not (fresh / "metrics.jsonl").exists() and not (fresh / "checkpoints").exists()
