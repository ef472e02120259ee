"""SLURM: the job script's wiring (run with stand-ins for srun and scontrol), bad input, and real jobs on a local
two-node cluster: a 2-node run over gloo, and a run warned of its end mid-run that checkpoints, requeues itself,
resumes and ends as the uninterrupted run did."""

from __future__ import annotations

import contextlib
import json
import os
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, cli_in_process, read_metrics, refused_alike, run_cli
from slurm.cluster import LocalCluster

from launcher import checkpoint

QUICKSTART = str(REPO / "recipes" / "quickstart.yaml")
FAKE_SCONTROL = """#!/bin/bash
case "$1 $2" in
  "show hostnames") printf 'gpu-a17\\ngpu-a18\\ngpu-a19\\ngpu-a20\\n' ;;
  "show node") echo "   NodeAddr=10.1.0.$(( ${3#gpu-a} )) NodeHostName=$3 Version=22.05" ;;
  *) echo "scontrol $*" >> "$FAKE_LOG" ;;
esac
"""
# srun: run the task's command once per node, as SLURM would with one task per node, each with its node id.
FAKE_SRUN = """#!/bin/bash
while [[ "$1" == --* ]]; do shift; done
for node in 0 1 2 3; do SLURM_NODEID=$node "$@"; done
"""
# python: print the launch command; answer the script's own small python calls for real.
FAKE_PYTHON = f"""#!/bin/bash
if [ "$1" = "-c" ]; then exec {sys.executable} "$@"; fi
echo "node $SLURM_NODEID: $*" >> "$FAKE_LOG"
"""


def _executable(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_dry_run_wires_4_nodes_of_8_gpus(tmp_path: Path):
    proc = run_cli(
        "slurm", "submit", QUICKSTART, "optimizer.lr=0.001", "slurm.stop_before_end_s=600", "slurm.max_restarts=2",
        "--nodes", "4",
        "--gpus-per-node", "8",
        "--time", "24:00:00", "--partition", "gpu", "--dry-run", cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    script = proc.stdout
    for line in ("--nodes=4", "--ntasks-per-node=1", "--gpus-per-node=8", "--time=24:00:00", "--partition=gpu"):
        assert f"#SBATCH {line}\n" in script
    assert "#SBATCH --signal=B:USR1@120\n" in script and "#SBATCH --requeue\n" in script

    # Run it with stand-ins: each of the 4 "nodes" starts 8 processes with its rank and the first node's address.
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    _executable(bin_dir / "scontrol", FAKE_SCONTROL)
    _executable(bin_dir / "srun", FAKE_SRUN)
    _executable(bin_dir / "squeue", "#!/bin/bash\necho 1-02:03:04\n")  # time left: the job's end is near
    _executable(bin_dir / "python", FAKE_PYTHON)
    script = re.sub(r"^PYTHON=.*$", f"PYTHON={bin_dir / 'python'}", script, flags=re.M)
    (tmp_path / "job.sbatch").write_text(script)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "FAKE_LOG": str(log),
        "SLURM_JOB_ID": "123456",
        "SLURM_NNODES": "4",
        "SLURM_JOB_NODELIST": "gpu-a[17-20]",
        "SLURM_GPUS_ON_NODE": "8",
        "SLURM_SUBMIT_DIR": str(tmp_path),
    }
    ran = subprocess.run(["bash", "job.sbatch"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    calls = log.read_text().splitlines()
    launches = [c for c in calls if c.startswith("node ")]
    assert len(launches) == 4, (calls, ran.stderr)
    for node, call in enumerate(launches):
        run_dir = tmp_path / "runs" / "quickstart"
        budget = 93784 - 600  # stop and save 600 s before the end the job has left (1-02:03:04)
        assert call == (
            f"node {node}: -m launcher train {QUICKSTART} optimizer.lr=0.001 slurm.stop_before_end_s=600 "
            f"slurm.max_restarts=2 run_dir={run_dir} train.max_time_s={budget} resume=auto --processes 8 "
            f"--max-restarts 2 --nodes 4 "
            f"--node-rank {node} --master-addr 10.1.0.17 --master-port {20000 + 123456 % 20000}"
        ), call
    start = json.loads((tmp_path / "runs" / "quickstart" / "slurm" / "attempts.jsonl").read_text().splitlines()[0])
    assert start["event"] == "start" and start["job"] == 123456 and start["restart"] == 0


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--time", "1h"], "error: --time: expected HH:MM:SS, MM:SS, MM or D-HH:MM:SS, got '1h'"),
        (["--time", "00:10:00", "--nodes", "0"], "error: --nodes: must be >= 1, got 0"),
    ],
)
def test_bad_options_are_one_line_and_exit_2(tmp_path: Path, args: list[str], expected: str):
    proc = run_cli("slurm", "submit", QUICKSTART, *args, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [expected]
    assert not (tmp_path / "runs").exists()


def test_a_missing_sbatch_is_one_line_and_exit_2(tmp_path: Path):
    env = {**os.environ, "PATH": str(tmp_path)}  # no sbatch there
    proc = subprocess.run(
        [sys.executable, "-m", "launcher", "slurm", "submit", QUICKSTART, "--time", "00:10:00"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: sbatch: not found on PATH; run this on a SLURM login node, or use --dry-run"
    ]
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------------------------------- a real cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    """Fails (never skips) when the cluster cannot start, with the reason."""
    started = LocalCluster(tmp_path_factory.mktemp("slurm")).start()
    yield started
    started.stop()


RUN = ["logging.progress_bar=false", "logging.every_steps=1", "checkpoint.every_steps=50", "strategy.timeout_s=120",
       "train.max_steps=384"]  # fmt: skip


def submitting(cluster: LocalCluster, run_dir: Path, *extra: str, nodes: int = 2, time: str = "00:10:00"):
    return subprocess.run(
        [sys.executable, "-m", "launcher", "slurm", "submit", QUICKSTART, f"run_dir={run_dir}", *RUN, *extra,
         "--nodes", str(nodes), "--gpus-per-node", "0", "--time", time],
        cwd=run_dir.parent, env=cluster.env(), capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def submit(cluster: LocalCluster, run_dir: Path, *extra: str, time: str = "00:10:00") -> str:
    proc = submitting(cluster, run_dir, *extra, time=time)
    assert proc.returncode == 0, proc.stderr
    return re.search(r"submitted job (\d+)", proc.stdout).group(1)


def job_state(cluster: LocalCluster, job: str) -> str:
    out = cluster.run("scontrol", "show", "job", job).stdout
    match = re.search(r"JobState=(\w+)", out)
    return match.group(1) if match else "GONE"


def wait_for(condition, timeout: float, what: str, state=lambda: "", every_s: float = 0.5) -> None:
    """Until `condition()`; a timeout says what it waited for and, where `state` tells it, how the job stood."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what} {state()}"
        time.sleep(every_s)


def job_report(cluster: LocalCluster, job: str, run_dir: Path):
    """The job's state and the end of its log, for a wait that timed out."""

    def report() -> str:
        log = run_dir / "slurm" / f"{job}.out"
        tail = log.read_text()[-2000:] if log.is_file() else "(no log yet)"
        return f"(job {job}: {job_state(cluster, job)})\n{tail}"

    return report


def slurm_status(cluster: LocalCluster, run_dir: Path) -> str:
    """`launcher slurm status RUN_DIR`'s line, with the cluster's squeue."""
    proc = subprocess.run(
        [sys.executable, "-m", "launcher", "slurm", "status", str(run_dir)],
        env=cluster.env(), capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def attempt_events(run_dir: Path) -> list[dict]:
    path = run_dir / "slurm" / "attempts.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


@pytest.fixture(scope="module")
def uninterrupted(cluster: LocalCluster, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("jobs") / "full"
    job = submit(cluster, run_dir)
    wait_for(lambda: job_state(cluster, job) in ("COMPLETED", "FAILED", "CANCELLED"), 300, f"job {job}")
    assert job_state(cluster, job) == "COMPLETED", (run_dir / "slurm" / f"{job}.out").read_text()[-3000:]
    return run_dir


@pytest.mark.slow
def test_a_job_trains_across_two_slurm_nodes(uninterrupted: Path):
    env = json.loads((uninterrupted / "env.json").read_text())
    assert env["world_size"] == 2
    assert json.loads((uninterrupted / "last_run.json").read_text())["stop_reason"] == "done"


@pytest.mark.slow
def test_a_warned_job_checkpoints_requeues_resumes_and_ends_as_the_uninterrupted_one(
    cluster: LocalCluster, uninterrupted: Path, tmp_path: Path
):
    run_dir = tmp_path / "preempted"
    job = submit(cluster, run_dir)
    report = job_report(cluster, job, run_dir)
    wait_for(lambda: (run_dir / "checkpoints" / "step_00000100").is_dir(), 300, "a checkpoint at step 100", report)
    # SLURM's warning before the end, as --signal=B:USR1@120 sends it, to the batch script alone.
    assert cluster.run("scancel", "--signal=USR1", "--batch", job).returncode == 0
    wait_for(lambda: job_state(cluster, job) == "PENDING", 120, "the job to requeue itself", report)
    # SLURM holds a requeued job back for a while (BeginTime) so that the nodes finish cleaning up after it; once
    # they have (idle again), let it start now rather than in two minutes.
    wait_for(lambda: cluster.run("sinfo", "-h", "-N", "-o", "%t").stdout.split() == ["idle", "idle"], 120, "idle")
    # A start in the same second or so as the requeue is refused by slurmd ("Job credential revoked"): a few more.
    time.sleep(5)
    cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now")
    wait_for(lambda: job_state(cluster, job) in ("COMPLETED", "FAILED", "CANCELLED"), 300, f"job {job}", report)
    log = (run_dir / "slurm" / f"{job}.out").read_text()
    assert job_state(cluster, job) == "COMPLETED", log[-3000:]

    stopped = re.search(r"stopped \(stop file\) at step (\d+)/384", log)
    assert stopped and 100 <= int(stopped.group(1)) < 384, log[-3000:]
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{int(stopped.group(1)):08d}'}" in log
    events = [e for e in attempt_events(run_dir) if e["event"] != "submit"]  # (submit's line may come after start)
    assert [e["event"] for e in events] == ["start", "requeue", "start"]
    assert events[1]["reason"] == "stop file" and events[2]["restart"] == 1

    full, resumed = (
        json.loads((uninterrupted / "last_run.json").read_text()),
        json.loads((run_dir / "last_run.json").read_text()),
    )
    assert resumed["step"] == full["step"] == 384
    assert resumed["val/loss"] == full["val/loss"]  # the same final loss, exactly
    train_full = {r["step"]: r["train/loss"] for r in read_metrics(uninterrupted) if "train/loss" in r}
    train_resumed = {r["step"]: r["train/loss"] for r in read_metrics(run_dir) if "train/loss" in r}
    assert train_resumed == train_full

    status = slurm_status(cluster, run_dir)
    assert f"job {job} (COMPLETED): 2 attempt(s), 1 requeue(s)" in status
    assert "last attempt ended: done at step 384/384" in status


@pytest.mark.slow
def test_a_cancelled_job_saves_ends_and_is_not_requeued(cluster: LocalCluster, tmp_path: Path):
    run_dir = tmp_path / "cancelled"
    # More nodes than the partition has (sinfo asked): refused before anything is written, not left pending.
    refused = submitting(cluster, run_dir, nodes=3)
    assert refused.returncode == 2 and not run_dir.exists()
    assert refused.stderr.strip().splitlines() == ["error: --nodes: the default partition has 2 node(s), got 3"]

    job = submit(cluster, run_dir)
    report = job_report(cluster, job, run_dir)
    wait_for(lambda: (run_dir / "checkpoints" / "step_00000050").is_dir(), 300, "a checkpoint at step 50", report)
    assert cluster.run("scancel", job).returncode == 0  # SIGTERM to the tasks and the job script alike
    ended = lambda: any(e["event"] == "cancel" for e in attempt_events(run_dir))  # noqa: E731
    wait_for(ended, 90, "the job script to record the cancel", report)
    wait_for(lambda: job_state(cluster, job) == "CANCELLED", 60, "the job to end", report)

    assert [e["event"] for e in attempt_events(run_dir) if e["event"] != "submit"] == ["start", "cancel"]
    last = json.loads((run_dir / "last_run.json").read_text())
    assert last["stop_reason"] in ("SIGTERM", "stop file") and last["step"] > 50, last
    assert (run_dir / "checkpoints" / f"step_{last['step']:08d}").is_dir()  # saved where it stopped
    assert not (run_dir / "STOP").exists()
    assert "ExitCode=0:0" in cluster.run("scontrol", "show", "job", job).stdout  # a clean save: the script exits 0
    status = slurm_status(cluster, run_dir)
    assert f"job {job} (CANCELLED): 1 attempt(s), 0 requeue(s)" in status and "cancelled (not requeued)" in status


@pytest.mark.slow
def test_a_job_at_its_time_limit_saves_and_requeues(cluster: LocalCluster, tmp_path: Path):
    # No warning before the end: SLURM's SIGTERM at the time limit (to the tasks and the script) is all it gets.
    run_dir = tmp_path / "timed_out"
    longer = ("train.max_steps=10000000", "train.max_epochs=5000", "early_stopping.patience=100000")  # still training
    job = submit(cluster, run_dir, *longer, "slurm.signal_before_s=0", time="00:01:00")
    report = job_report(cluster, job, run_dir)
    requeued = lambda: any(e["event"] == "requeue" for e in attempt_events(run_dir))  # noqa: E731
    ended = lambda: job_state(cluster, job) in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")  # noqa: E731
    wait_for(lambda: requeued() or ended(), 180, "the job script to requeue the job", report)
    assert requeued(), report()
    wait_for(lambda: job_state(cluster, job) == "PENDING", 60, "the job to be pending again", report)
    status = slurm_status(cluster, run_dir)
    cluster.run("scancel", job)  # (not its next attempt: the cluster is needed for the other tests)

    requeue = next(e for e in attempt_events(run_dir) if e["event"] == "requeue")
    assert requeue["ending"] == "COMPLETING TimeLimit", requeue  # how the job stood when the TERM came
    last = json.loads((run_dir / "last_run.json").read_text())
    assert last["stop_reason"] in ("SIGTERM", "stop file"), last
    assert (run_dir / "checkpoints" / f"step_{last['step']:08d}").is_dir()
    assert not (run_dir / "STOP").exists()
    # SLURM holds a requeued job back for about two minutes: status says so.
    assert re.search(
        rf"job {job} \(PENDING, reason BeginTime, expected start \S+\): 1 attempt\(s\), 1 requeue", status
    ), status


# Short runs (5 to 30 s each, by the machine's load) still running when a task is warned after its first checkpoint.
# A task's 800 updates take seconds: time for task 0 to be signalled after its first checkpoint (at 50).
SWEEP = ["logging.progress_bar=false", "logging.every_steps=10", "checkpoint.every_steps=50", "eval.every_steps=400",
         "strategy.timeout_s=120", "train.max_steps=800"]  # fmt: skip


@pytest.mark.slow
def test_a_sweep_is_one_array_whose_warned_task_requeues_and_resumes_and_report_ranks_its_runs(
    cluster: LocalCluster, tmp_path: Path
):
    sweep_dir = tmp_path / "sweep"
    proc = subprocess.run(
        [sys.executable, "-m", "launcher", "slurm", "sweep", QUICKSTART, "optimizer.lr=1e-3,3e-3",
         "train.batch_size=16,32", *SWEEP, "--sweep-dir", str(sweep_dir), "--max-parallel", "2", "--nodes", "1",
         "--gpus-per-node", "0", "--time", "00:10:00"],
        cwd=tmp_path, env=cluster.env(), capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    job = re.search(r"submitted job array (\d+) \(0-3%2\)", proc.stdout).group(1)
    tasks = json.loads((sweep_dir / "sweep.json").read_text())["tasks"]
    assert [t["overrides"] for t in tasks] == [
        {"optimizer.lr": lr, "train.batch_size": bs} for lr in ("1e-3", "3e-3") for bs in ("16", "32")
    ]
    first, task0 = Path(tasks[0]["run_dir"]), f"{job}_0"
    log = sweep_dir / "slurm" / f"{job}_0.out"

    def report() -> str:
        return f"(task {task0}: {job_state(cluster, task0)})\n" + (log.read_text()[-2000:] if log.is_file() else "")

    # Any complete checkpoint (keep_last: 2, so step 50's may be gone by the next look).
    saved = lambda: (first / "checkpoints").is_dir() and checkpoint.complete_steps(first / "checkpoints")  # noqa: E731
    wait_for(saved, 180, "task 0's first checkpoint", report, every_s=0.1)
    # SLURM's warning before the end, to task 0's batch script alone: it must requeue task 0, not the array. (scancel
    # of slurm 22.05 delivers a signal to an array task at once, then retries "Job is in transitional state" for
    # good: it is stopped after a few seconds.)
    with contextlib.suppress(subprocess.TimeoutExpired):
        cluster.run("scancel", "--signal=USR1", "--batch", task0, timeout=3)
    wait_for(lambda: job_state(cluster, task0) == "PENDING", 120, "task 0 to requeue itself", report)
    time.sleep(5)  # (a start in the same second as the requeue is refused by slurmd)
    cluster.run("scontrol", "update", f"JobId={task0}", "StartTime=now")  # not in two minutes (BeginTime)
    states = lambda: [job_state(cluster, f"{job}_{i}") for i in range(4)]  # noqa: E731
    done = lambda: all(s in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT") for s in states())  # noqa: E731
    wait_for(done, 300, "the 4 tasks to end", lambda: f"{states()} {report()}")
    assert states() == ["COMPLETED"] * 4, report()

    stopped = re.search(r"stopped \(stop file\) at step (\d+)/800", log.read_text())
    assert stopped and 50 <= int(stopped.group(1)) < 800, report()
    assert f"resumed from {first / 'checkpoints' / f'step_{int(stopped.group(1)):08d}'}" in log.read_text()
    events = [e for e in attempt_events(first) if e["event"] != "submit"]
    assert [(e["event"], e["job"]) for e in events] == [("start", task0), ("requeue", task0), ("start", task0)]
    for t in tasks[1:]:
        assert [e["event"] for e in attempt_events(Path(t["run_dir"])) if e["event"] != "submit"] == ["start"]

    status = slurm_status(cluster, sweep_dir).splitlines()
    assert len(status) == 5 and f"job {task0} (COMPLETED): 2 attempt(s), 1 requeue(s)" in status[1], status
    ranked = run_cli("report", str(sweep_dir), "--json", "--out", str(tmp_path / "plots"), cwd=tmp_path)
    assert ranked.returncode == 0, ranked.stderr
    runs = json.loads(ranked.stdout)["runs"]
    best = [r["best"]["value"] for r in runs]
    assert sorted({r["task"] for r in runs}) == [0, 1, 2, 3] and best == sorted(best, reverse=True)  # val/accuracy
    assert (tmp_path / "plots" / "val_accuracy.png").is_file() and (tmp_path / "plots" / "loss.png").is_file()
    assert runs[[r["task"] for r in runs].index(0)]["requeues"] == 1


def test_the_shipped_template_is_the_generic_job_script():
    from launcher.slurm import JobOptions, render

    generic = render(None, "", JobOptions(nodes=2, gpus_per_node=8, time="24:00:00"), name="launcher")
    assert (REPO / "slurm" / "train.sbatch").read_text() == generic, "regenerate slurm/train.sbatch"


def test_slurm_time_formats():
    from launcher.slurm import parse_time

    assert parse_time("10") == 600
    assert parse_time("10:30") == 630
    assert parse_time("24:00:00") == 86400
    assert parse_time("1-12") == 36 * 3600
    assert parse_time("2-00:30:05") == 2 * 86400 + 1805
    for bad in ("", "1h", "1:2:3:4", " 10:00", "-5"):
        with pytest.raises(ValueError):
            parse_time(bad)


def test_status_reads_past_a_line_cut_short_by_a_dying_node(tmp_path: Path):
    # A node killed mid-append leaves half a line; `slurm status` must still say which job runs the run.
    (tmp_path / "slurm").mkdir()
    (tmp_path / "slurm" / "attempts.jsonl").write_text(
        '{"event": "start", "job": 41, "restart": 0, "node": "n1", "time": "t"}\n'
        '{"event": "requeue", "job": 41, "restart": 0, "node": "n1", "time": "t"}\n'
        '{"event": "start", "job": 41, "restart": 1, "node": "n2", "time": "t"}\n'
        '{"event": "requeue", "jo'
    )
    proc = run_cli("slurm", "status", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "job 41 " in proc.stdout and "2 attempt(s), 1 requeue(s)" in proc.stdout


SUBMIT = ("slurm", "submit", "--dry-run")


@pytest.mark.parametrize(
    ("override", "problem"),
    [
        ("slurm.time=abc", "slurm.time: expected HH:MM:SS, MM:SS, MM or D-HH:MM:SS, got 'abc'"),
        ("slurm.nodes=-1", "slurm.nodes: must be >= 1, got -1"),
        ("slurm.max_requeues=-1", "slurm.max_requeues: must be >= 0, got -1"),
        ("slurm.signal_before_s=70000", "slurm.signal_before_s: must be <= 65535 (SLURM's limit), got 70000"),
        ("slurm.sbatch=--qos", "slurm.sbatch: expected a list of sbatch options, one per item; got a string ('--qos')"),
        ("slurm.sbatch=nan", "slurm.sbatch: expected a list of sbatch options, one per item; got a string ('nan')"),
        ("slurm.sbatch=[nan]", "slurm.sbatch: expected sbatch options such as --qos=high, one per item; got 'nan'"),
        ("slurm.setup=module load cuda", "slurm.setup: expected a list of shell lines, one per item; got a string"),
    ],
)
def test_a_bad_slurm_section_is_refused_alike_by_validate_train_and_submit(tmp_path: Path, override: str, problem: str):
    refused = refused_alike(Path(QUICKSTART), override, work=tmp_path, verbs=(("validate",), ("train",), SUBMIT))
    assert len(refused) == 1 and refused[0].startswith(problem), refused


def test_a_bad_slurm_section_in_a_file_is_refused_alike(tmp_path: Path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"base: {QUICKSTART}\nslurm:\n  time: 1h\n  sbatch: --qos=high\n")
    assert refused_alike(recipe, work=tmp_path / "work", verbs=(("validate",), ("train",), SUBMIT)) == [
        "slurm.sbatch: expected a list of sbatch options, one per item; got a string ('--qos=high')",
        "slurm.time: expected HH:MM:SS, MM:SS, MM or D-HH:MM:SS, got '1h'",
    ]


def test_sbatch_options_given_as_a_list_reach_the_job_script(tmp_path: Path):
    code, script, err = cli_in_process([*SUBMIT, QUICKSTART, "slurm.sbatch=[--qos=high, --exclusive]"], tmp_path)
    assert code == 0, err
    assert "#SBATCH --qos=high\n#SBATCH --exclusive\n" in script


def test_more_nodes_than_the_partition_has_are_refused_at_submit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _executable(bin_dir / "sbatch", "#!/bin/bash\necho 77\n")
    # A node per line and partition, as `sinfo -h -N -o "%N %P"` lists them; the default partition has a `*`.
    _executable(bin_dir / "sinfo", "#!/bin/bash\nprintf 'a1 cpu*\\na2 cpu*\\ng1 gpu\\ng1 all\\ng2 gpu\\ng3 gpu\\n'\n")
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    for flags, line in [
        (["--nodes", "3"], "error: --nodes: the default partition has 2 node(s), got 3"),
        (["--nodes", "4", "--partition", "gpu"], "error: --nodes: partition gpu has 3 node(s), got 4"),
    ]:
        code, _, err = cli_in_process(["slurm", "submit", QUICKSTART, *flags], tmp_path)
        assert (code, err.strip().splitlines()) == (2, [line])
        assert not (tmp_path / "runs").exists()


def test_a_pending_job_has_a_status_and_run_dir_is_given_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _executable(bin_dir / "sbatch", "#!/bin/bash\necho 77\n")
    _executable(bin_dir / "squeue", "#!/bin/bash\necho 'PENDING|BeginTime|2030-01-02T03:04:05'\n")  # no sinfo here
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    code, out, err = cli_in_process(["slurm", "submit", QUICKSTART, "run_dir=mine", "--time", "00:10:00"], tmp_path)
    assert code == 0, err
    script = (tmp_path / "mine" / "slurm" / "job.sbatch").read_text()
    assert re.findall(r"run_dir=[^\s)]+", script) == [f"run_dir={tmp_path / 'mine'}"]  # the user's, resolved, once
    code, out, err = cli_in_process(["slurm", "status", "mine"], tmp_path)
    assert code == 0, err
    assert out.startswith(
        "job 77 (PENDING, reason BeginTime, expected start 2030-01-02T03:04:05): 0 attempt(s), 0 requeue(s), "
        "0 restart(s); "
        "last attempt ended: -; last checkpoint: none"
    ), out


def test_progress_in_a_log_file_is_plain_lines(tmp_path: Path):
    proc = run_cli("train", QUICKSTART, f"run_dir={tmp_path / 'run'}", "train.max_steps=20", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "\r" not in proc.stderr  # tqdm's bar redraws with carriage returns
    assert re.search(r"^quickstart: step 20/20 \(100\.0%\), [\d.]+ it/s, eta 0:00:00, loss=", proc.stderr, re.M)
