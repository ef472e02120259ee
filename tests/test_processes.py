"""`launcher train --processes N`: the processes started through torch's elastic agent, each failure said once with
its own exit code, restarts that continue from the newest checkpoint, stop requests passed on."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launcher import processes
from launcher.processes import Failure, Launch
from tests.conftest import free_port, read_metrics, run_cli

TIMEOUT = 180


def train(recipe: Path, *args: str, env: dict[str, str] | None = None, launcher: list[str] | None = None):
    """`launcher train RECIPE ARGS` beside the recipe (where its model's module is)."""
    return run_cli("train", str(recipe), *args, cwd=recipe.parent, timeout=TIMEOUT, launcher=launcher, env=env)


def errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


# ------------------------------------------------------------------------------------------- pure decisions


def test_the_first_failure_that_has_something_to_say_is_said_once():
    refusal = Failure(1, 2, ("error: model: refused",), time=2.0)
    quiet = Failure(0, 1, time=1.0)  # a rank whose main process speaks for it
    assert processes.outcome([quiet, refusal]) == (["error: model: refused"], 2)
    killed = Failure(1, -9, time=float("-inf"))
    lost_peer = Failure(0, 1, ("error: rank 0: ... another process died",), time=3.0)
    assert processes.outcome([killed, lost_peer]) == (["error: rank 1 was killed by SIGKILL"], 1)
    raised = Failure(1, 1, said="RuntimeError: boom", time=1.0)
    assert processes.outcome([raised, lost_peer]) == ([], 1)  # its traceback is printed; the exit code is its own
    assert processes.summary([raised, lost_peer]) == "rank 1 failed: RuntimeError: boom"
    assert processes.outcome([]) == ([], 0)


def test_failures_are_read_back_those_that_failed_first_first(tmp_path: Path):
    env = {processes.REPORTS_ENV: str(tmp_path), "RANK": "0", processes.RESTART_ENV: "1"}
    processes.report_failure(["error: rank 0: another process died"], 1, env=env)
    failures = processes.read_failures(tmp_path / "attempt1", {0: 1, 1: -9, 2: 0}, first={1})
    assert [(f.rank, f.exit_code) for f in failures] == [(1, -9), (0, 1)]
    assert failures[1].lines == ("error: rank 0: another process died",)


@pytest.mark.parametrize(
    ("launch", "env", "problem"),
    [
        (Launch(processes=0), {}, "--processes: must be >= 1, got 0"),
        (Launch(processes=2, nodes=2, node_rank=2), {}, "--node-rank: must be between 0 and --nodes - 1 (1), got 2"),
        (Launch(processes=2, max_restarts=-1), {}, "--max-restarts: must be >= 0, got -1"),
        (Launch(processes=2, master_port=70000), {}, "--master-port: must be a port between 1 and 65535, got 70000"),
        (Launch(processes=2), {"LOCAL_RANK": "0"}, "--processes: this process was itself started as one of several"),
    ],
)
def test_bad_start_flags_are_one_line(launch: Launch, env: dict[str, str], problem: str):
    assert [p for p in processes.launch_problems(launch, env) if p.startswith(problem)]


@pytest.mark.parametrize("variable", [processes.RESTART_ENV, processes.ATTEMPT_ENV])
def test_a_restarted_process_goes_on_over_what_the_first_attempt_wrote(
    tiny_recipe: Path, tmp_path: Path, variable: str
):
    """A first attempt that failed before its first checkpoint left metrics behind: a new run there is refused, a
    restarted one (torch's count, or the launcher agent's) starts over them."""
    from launcher import runlock
    from launcher.errors import RecipeError
    from launcher.preflight import preflight
    from launcher.recipe import load_recipe

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 3, "train/loss": 1.0}\n')
    recipe = load_recipe(tiny_recipe, [f"run_dir={run_dir}"])
    with pytest.raises(RecipeError, match="already holds a run"):
        preflight(recipe, {})
    start = preflight(recipe, {variable: "1"})
    runlock.release(start.lock)
    assert (start.resume_from, start.restart, start.refusal) == (None, 1, [])


# ---------------------------------------------------------------------------------------------- real processes


def test_a_bad_recipe_is_one_line_and_exit_2_before_any_process_starts(tiny_recipe: Path, tmp_path: Path):
    proc = run_cli("train", str(tiny_recipe), "--processes", "2", f"run_dir={tmp_path / 'run'}", "optimizer.lr=-1")
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("error: "), proc.stderr
    assert not (tmp_path / "run").exists()


def test_a_refusal_on_one_rank_is_its_one_line_and_exit_2(faulty: Path):
    proc = train(
        faulty, "--processes", "2", "--max-restarts", "2", "run_dir=run", env={"FAULT": "refuse", "FAULT_AT": "5"}
    )
    assert proc.returncode == 2, proc.stderr
    assert errors(proc.stderr) == [f"error: {faulty}: model: refused on this rank"], proc.stderr
    assert "restarting" not in proc.stderr  # a refusal is not bad luck: it is not restarted
    assert "Traceback" not in proc.stderr


def test_a_failure_at_the_same_step_stops_after_the_restarts_with_its_error_and_no_agent_traceback(faulty: Path):
    """Rank 1 raises at step 25 on every attempt: its traceback each time, one restart, then exit code 1 and the
    error; never the agent's traceback."""
    proc = train(
        faulty, "--processes", "2", "--max-restarts", "1", "run_dir=run", env={"FAULT": "raise", "FAULT_AT": "25"}
    )
    assert proc.returncode == 1, proc.stderr
    tracebacks = [line for line in proc.stderr.splitlines() if line.endswith("RuntimeError: boom at call 25")]
    assert len(tracebacks) == 2, proc.stderr  # the last line of each attempt's traceback
    assert proc.stderr.count("restarting the processes (restart 1 of 1)") == 1
    last = "error: rank 1 failed: RuntimeError: boom at call 25; no restart left (--max-restarts 1)"
    assert errors(proc.stderr)[-1] == last
    for agents_own in ("ChildFailedError", "torch.distributed.elastic", "Root Cause"):
        assert agents_own not in proc.stderr


def test_a_killed_rank_is_restarted_and_the_run_ends_as_under_accelerate_launch(faulty: Path):
    """The uninterrupted run under `accelerate launch`; the same run under `launcher train --processes 2
    --max-restarts 1` with rank 1 SIGKILLed at step 25 (after the checkpoint at step 20) finishes by itself, with
    the same losses at every step."""
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                  "--main_process_port", "0", "-m", "launcher"]  # fmt: skip
    full = train(faulty, "run_dir=full", launcher=accelerate)
    assert full.returncode == 0, full.stderr
    proc = train(faulty, "--processes", "2", "--max-restarts", "1", "run_dir=restarted",
                 env={"FAULT": "kill", "FAULT_AT": "25", "ONCE": "1"})  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "warning: rank 1 was killed by SIGKILL; restarting the processes (restart 1 of 1)" in proc.stderr
    assert f"resumed from {Path('restarted') / 'checkpoints' / 'step_00000020'} at step 20" in proc.stdout + proc.stderr
    root = faulty.parent
    assert json.loads((root / "restarted" / "env.json").read_text())["world_size"] == 2
    losses = [
        {r["step"]: r.get("train/loss", r.get("val/loss")) for r in read_metrics(root / run)}
        for run in ("full", "restarted")
    ]
    assert losses[0] == losses[1] and max(losses[0]) == 40
    starts = [json.loads(line) for line in (root / "restarted" / "history.jsonl").read_text().splitlines()][:2]
    assert [(s["event"], s["step"], s.get("restart")) for s in starts] == [("start", 0, None), ("start", 20, 1)]
    report = json.loads(run_cli("report", str(root / "restarted"), "--json").stdout)[0]
    assert (report["attempts"], report["resumes"], report["restarts"]) == (2, 1, 1)


def test_a_stop_request_sent_to_the_agent_reaches_every_process_which_save_and_exit_0(
    tiny_recipe: Path, tmp_path: Path
):
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    agent = subprocess.Popen(
        [sys.executable, "-m", "launcher", "train", str(tiny_recipe), "--processes", "2", f"run_dir={run_dir}",
         "train.max_steps=100000", "checkpoint.every_steps=100000"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + TIMEOUT
    while not (run_dir / "metrics.jsonl").is_file() or not read_metrics(run_dir):
        assert time.monotonic() < deadline and agent.poll() is None, agent.communicate()
        time.sleep(0.1)
    agent.send_signal(signal.SIGTERM)
    _, err = agent.communicate(timeout=TIMEOUT)
    assert agent.returncode == 0, err
    last = json.loads((run_dir / "last_run.json").read_text())
    assert last["stop_reason"] == "SIGTERM" and (run_dir / "checkpoints" / f"step_{last['step']:08d}").is_dir()


def test_two_machines_meet_though_one_starts_later_restart_together_and_a_lone_one_gives_up_in_one_line(
    faulty: Path,
):
    """Two machine ranks on 127.0.0.1, the second started two seconds after the first, train as one run; rank 1
    SIGKILLed at step 25 restarts both machines' processes, which finish the run from the checkpoint at step 20. A
    machine whose rendezvous nobody holds gives up within strategy.timeout_s, naming the address and port."""
    port = str(free_port())
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
        "FAULT": "kill",
        "FAULT_AT": "25",
        "ONCE": "1",
    }

    def machine(rank: int, *extra: str) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "launcher", "train", str(faulty), "--processes", "1", "--nodes", "2",
             "--node-rank", str(rank), "--master-addr", "127.0.0.1", "--master-port", port, *extra],
            cwd=faulty.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip

    first = machine(0, "run_dir=run", "--max-restarts", "1")
    time.sleep(2)
    second = machine(1, "run_dir=run", "--max-restarts", "1")
    errs = [proc.communicate(timeout=TIMEOUT)[1] for proc in (first, second)]
    assert [first.returncode, second.returncode] == [0, 0], errs
    assert sum("restarting" in err for err in errs) == 2, errs  # one machine for its failure, the other with it
    run = faulty.parent / "run"
    assert json.loads((run / "env.json").read_text())["world_size"] == 2
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert [(e["event"], e["step"]) for e in history] == [("start", 0), ("start", 20), ("end", 40)]

    started = time.monotonic()
    lone = machine(1, "run_dir=lone", "strategy.timeout_s=3")
    _, err = lone.communicate(timeout=TIMEOUT)
    assert lone.returncode == 1 and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"error: the rendezvous at 127.0.0.1:{port} did not complete within strategy.timeout_s=3")
    assert time.monotonic() - started < 60 and not (faulty.parent / "lone").exists()
