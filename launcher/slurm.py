"""SLURM: the job script a recipe runs under, `launcher slurm submit` and `launcher slurm status`.

The script asks for one task per node; each runs `launcher train --processes` with its node's rank, the first
node's address and a port derived from the job id, and restarts its processes `slurm.max_restarts` times after a
failure. SLURM's warning before the end (`--signal=B:USR1@...`) and SIGTERM reach the batch script, which only
creates the run's stop file: every process then stops at the same step and saves (the loop's consensus), and the
script requeues the job (`scontrol requeue`) up to `slurm.max_requeues` times; the requeued job continues with
`resume=auto`. A SIGTERM from `scancel` (the job COMPLETING with reason None) ends the job instead. Rendering is a
pure function of the recipe and the options.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from launcher.errors import RecipeError
from launcher.layout import (
    CHECKPOINTS_DIR,
    HISTORY_FILE,
    LAST_RUN_FILE,
    RECIPE_FILE,
    SLURM_ATTEMPTS_FILE,
    read_json,
    read_jsonl,
    restarts,
    step_dir_name,
)
from launcher.slurm_time import TIME_FORMATS, parse_time
from launcher.storage import checkpoints_at


@dataclass(frozen=True)
class JobOptions:
    nodes: int
    gpus_per_node: int
    time: str
    partition: str | None = None
    account: str | None = None
    max_requeues: int = 3
    max_restarts: int = 0  # restarts of the processes after a failure (`launcher train --max-restarts`)
    signal_before_s: int = 120
    stop_before_end_s: int = 0  # stop and save this long before the job's end, even without SLURM's signal
    sbatch: tuple[str, ...] = ()  # further sbatch options, e.g. "--qos=high"
    setup: tuple[str, ...] = ()  # shell lines run before training: module load, source venv/bin/activate


def options_problems(options: JobOptions) -> list[str]:
    """Problems with the job's options once `launcher slurm submit`'s flags are applied (the recipe's own `slurm:`
    values are checked with the rest of the recipe)."""
    problems = []
    try:
        seconds = parse_time(options.time)
    except ValueError:
        problems.append(f"--time: expected {TIME_FORMATS}, got {options.time!r}")
        seconds = 0
    if options.nodes < 1:
        problems.append(f"--nodes: must be >= 1, got {options.nodes}")
    if options.gpus_per_node < 0:
        problems.append(f"--gpus-per-node: must be >= 0, got {options.gpus_per_node}")
    # Against the time the job gets, which a --time flag may change: so here, not with the recipe's values.
    if seconds and options.stop_before_end_s >= seconds:
        problems.append(
            f"slurm.stop_before_end_s: {options.stop_before_end_s} s is not less than the job's time ({seconds} s)"
        )
    return problems


def job_options(defaults: Any, **flags: Any) -> JobOptions:
    """The job's options: `launcher slurm submit`'s (and `sweep`'s) flags where given (not None), else the recipe's
    `slurm:` section (`defaults`)."""
    given = {k: v for k, v in flags.items() if v is not None and v != ""}
    kept = ("max_requeues", "max_restarts", "signal_before_s", "stop_before_end_s", "sbatch", "setup")
    fields = ("nodes", "gpus_per_node", "time", "partition", "account", *kept)
    return JobOptions(**{f: given.get(f, getattr(defaults, f)) for f in fields})


def header(o: JobOptions, name: str, output: str | None, array: str | None = None) -> list[str]:
    """The #SBATCH lines; `output` the log's path (None: SLURM's default), `array` a job array's indices."""
    return [
        "#!/bin/bash",
        f"#SBATCH --job-name={name}",
        f"#SBATCH --nodes={o.nodes}",
        "#SBATCH --ntasks-per-node=1",
        *([f"#SBATCH --gpus-per-node={o.gpus_per_node}"] if o.gpus_per_node else []),
        f"#SBATCH --time={o.time}",
        *([f"#SBATCH --partition={o.partition}"] if o.partition else []),
        *([f"#SBATCH --account={o.account}"] if o.account else []),
        f"#SBATCH --signal=B:USR1@{o.signal_before_s}",
        "#SBATCH --requeue",
        "#SBATCH --open-mode=append",
        *([f"#SBATCH --array={array}"] if array else []),
        *([f"#SBATCH --output={output}"] if output else []),
        *[f"#SBATCH {line}" for line in o.sbatch],
    ]


def render(
    train_args: list[str] | None,
    run_dir: str,
    options: JobOptions,
    name: str,
    workdir: str = '"$SLURM_SUBMIT_DIR"',
    python: str = "python",
) -> str:
    """The job script. `train_args` (recipe and overrides) are written into it; None leaves them to the script's
    own arguments (`sbatch slurm/train.sbatch RECIPE [overrides]`), and `run_dir` is then read from the recipe."""
    if train_args is None:
        args_lines = [
            'TRAIN_ARGS=("$@")  # the recipe and its overrides: sbatch slurm/train.sbatch RECIPE [key=value ...]',
            "RUN_DIR=$($PYTHON -c 'import sys; from launcher.recipe import load_recipe; "
            'print(load_recipe(sys.argv[1], sys.argv[2:]).run_dir)\' "${TRAIN_ARGS[@]}") || exit 2',
        ]
    else:
        args_lines = [
            f"TRAIN_ARGS=({' '.join(shlex.quote(a) for a in train_args)})",
            f"RUN_DIR={shlex.quote(run_dir)}",
        ]
    about = (
        "# The job script of `launcher slurm submit`, for use with sbatch directly; flags override the lines above:\n"
        "#   sbatch --nodes 4 --gpus-per-node 8 --time 24:00:00 slurm/train.sbatch RECIPE [key=value ...]\n"
        "# with a GPU-less partition, --gpus-per-node 0 runs one CPU process per node over gloo."
        if train_args is None
        else "# Generated by `launcher slurm submit`."
    )
    lines = header(options, name, f"{run_dir}/slurm/%j.out" if train_args is not None else None)
    return script(lines, args_lines, options, about, workdir, python)


def script(header_lines: list[str], args_lines: list[str], o: JobOptions, about: str, workdir: str, python: str) -> str:
    """The whole job script: the #SBATCH lines, then JOB_BODY, whose `args_lines` set TRAIN_ARGS and RUN_DIR."""
    body = JOB_BODY.format(
        about=about,
        workdir=workdir,
        python=python,
        args="\n".join(args_lines),
        max_requeues=o.max_requeues,
        max_restarts=o.max_restarts,
        stop_before_end_s=o.stop_before_end_s,
        setup="\n".join(o.setup),
        attempts_file=SLURM_ATTEMPTS_FILE,
    )
    return "\n".join(header_lines) + "\n" + body


def find_sbatch() -> str:
    """sbatch's path; RecipeError when it is not on PATH."""
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise RecipeError("sbatch: not found on PATH; run this on a SLURM login node, or use --dry-run")
    return sbatch


def partition_nodes(partition: str | None) -> int | None:
    """How many nodes `partition` (None: the default one, marked `*` by sinfo) has; None when sinfo is missing,
    fails or does not know the partition (sbatch then says what is wrong)."""
    sinfo = shutil.which("sinfo")
    if sinfo is None:
        return None
    try:
        proc = subprocess.run([sinfo, "-h", "-N", "-o", "%N %P"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:
        return None
    nodes = set()
    for line in proc.stdout.splitlines():  # a node per line and partition: "node1 debug*"
        node, _, part = line.strip().partition(" ")
        if part == partition or (partition is None and part.endswith("*")) or part == f"{partition}*":
            nodes.add(node)
    return len(nodes) or None


def check_nodes(options: JobOptions) -> None:
    """RecipeError for more nodes than the partition has: sbatch accepts such a job, which then pends forever."""
    have = partition_nodes(options.partition)
    if have is not None and options.nodes > have:
        which = f"partition {options.partition}" if options.partition else "the default partition"
        raise RecipeError(f"--nodes: {which} has {have} node(s), got {options.nodes}")


def submit(sbatch: str, script: Path) -> str:
    """Submit with sbatch; the job id. RecipeError when sbatch refuses."""
    proc = subprocess.run([sbatch, "--parsable", str(script)], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        detail = " ".join((proc.stderr or proc.stdout).split())
        raise RecipeError(f"sbatch: refused {script}: {detail}")
    return proc.stdout.strip().split(";")[0]


def record_submit(run_dir: Path, job: str) -> None:
    """A line in the attempts file, so that `status` knows the job before it starts (the job writes the rest)."""
    line = json.dumps({"event": "submit", "job": int(job) if job.isdigit() else job, "time": _now()})
    with open(run_dir / "slurm" / SLURM_ATTEMPTS_FILE, "a") as f:
        f.write(line + "\n")


def _now() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")  # as the job's `date -Is`


def queued(job: str | None) -> dict[str, str | None]:
    """The job's state, why it waits and when it is expected to start, from squeue; Nones when it is not there."""
    if job is None or not shutil.which("squeue"):
        return dict(NOT_QUEUED)
    # --states=all: an ended job too (COMPLETED, CANCELLED...), for as long as SLURM keeps it (MinJobAge).
    cmd = ["squeue", "-h", "--states=all", "-j", job, "-o", "%T|%r|%S"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return dict(NOT_QUEUED)
    fields = proc.stdout.strip().split("|")
    if proc.returncode != 0 or len(fields) != 3:
        return dict(NOT_QUEUED)
    return queue_entry(*fields)


NOT_QUEUED: dict[str, str | None] = {"state": None, "reason": None, "expected_start": None}


def queue_entry(state: str, reason: str, start: str) -> dict[str, str | None]:
    """squeue's %T, %r and %S as `queued` gives them."""
    unknown = ("", "None", "N/A", "(null)")
    return {
        "state": state,
        "reason": None if reason in unknown else reason,
        "expected_start": None if start in unknown or state != "PENDING" else start,
    }


def status(run_dir: Path, queue: dict[str, dict[str, str | None]] | None = None) -> dict[str, Any]:
    """Which job runs the run and how it stands in the queue, how often it was requeued, its last checkpoint and how
    its last attempt ended. `queue`: the queue by job id, found already, instead of asking squeue for this job."""
    from launcher.recipe import load_recipe

    attempts_file = run_dir / "slurm" / SLURM_ATTEMPTS_FILE
    if not attempts_file.is_file():
        raise RecipeError(f"{run_dir}: no SLURM job was submitted here (no slurm/{SLURM_ATTEMPTS_FILE})")
    events = read_jsonl(attempts_file)  # a line cut short by a node dying mid-append is skipped
    job = events[-1].get("job") if events else None
    job = None if job is None else str(job)
    # This job's lines: a run dir submitted again keeps the earlier jobs' lines.
    mine = [e for e in events if str(e.get("job")) == job]
    queue = queued(job) if queue is None else queue.get(job or "", dict(NOT_QUEUED))
    recipe_file = run_dir / RECIPE_FILE
    where: str | Path = run_dir / CHECKPOINTS_DIR
    if recipe_file.is_file():
        recipe = load_recipe(recipe_file, check_files=False, this_machine=False)
        where = recipe.checkpoint_store or recipe.checkpoint_dir
    steps = checkpoints_at(where)[0]
    last_checkpoint = f"{str(where).rstrip('/')}/{step_dir_name(steps[-1])}" if steps else None
    restarted = restarts(read_jsonl(run_dir / HISTORY_FILE))
    return {
        "job": job,
        **queue,
        "state": queue["state"] or "not in the queue",
        # The job's starts and the restarts of its processes after a failure (`slurm.max_restarts`), in the run's
        # history: each an attempt.
        "attempts": sum(e.get("event") == "start" for e in events) + restarted,
        "restarts": restarted,
        "requeues": sum(e.get("event") == "requeue" for e in events),
        "cancelled": any(e.get("event") == "cancel" for e in mine),
        "last_checkpoint": str(last_checkpoint) if last_checkpoint else None,
        "last_run": read_json(run_dir / LAST_RUN_FILE) or None,
    }


def describe(info: dict[str, Any]) -> str:
    """`status` in one line: `job 41 (PENDING, reason BeginTime, expected start ...): 1 attempt(s), ...`."""
    last = info["last_run"] or {}
    ended = f"{last.get('stop_reason')} at step {last.get('step')}/{last.get('total_steps')}" if last else "-"
    labels = (("reason", "reason"), ("expected_start", "expected start"))
    queue = "".join(f", {label} {info[key]}" for key, label in labels if info[key])
    cancelled = "; cancelled (not requeued)" if info["cancelled"] else ""
    return (
        f"job {info['job']} ({info['state']}{queue}): {info['attempts']} attempt(s), {info['requeues']} requeue(s), "
        f"{info['restarts']} restart(s); "
        f"last attempt ended: {ended}{cancelled}; last checkpoint: {info['last_checkpoint'] or 'none'}"
    )


def python_executable() -> str:
    return shlex.quote(sys.executable)


# The job script after its #SBATCH lines (str.format fields: see `render`).
JOB_BODY = """
{about}
# `launcher slurm status RUN_DIR` tells how the job is doing.
set -uo pipefail
cd {workdir} || exit 2
PYTHON={python}
{args}
MAX_REQUEUES={max_requeues}
export MAX_RESTARTS={max_restarts}
STOP_BEFORE_END_S={stop_before_end_s}
{setup}

# A task of a job array is named as the array's job and the task's index (41_3): that is the name `scontrol requeue`
# must be given to requeue the task itself (requeueing by its own job id is reported to fail with arrays).
JOB_ID=$SLURM_JOB_ID
JOB_JSON=$SLURM_JOB_ID
if [ -n "${{SLURM_ARRAY_JOB_ID:-}}" ]; then
    JOB_ID="${{SLURM_ARRAY_JOB_ID}}_${{SLURM_ARRAY_TASK_ID}}"
    JOB_JSON="\\"$JOB_ID\\""
fi

# One process per GPU the allocation gives each node; one CPU process (over gloo) where it gives none. The first
# node (node rank 0) holds the rendezvous at its SLURM address, whatever its hostname resolves to elsewhere.
GPUS_PER_NODE=${{SLURM_GPUS_ON_NODE:-0}}
export PROCS_PER_NODE=$(( GPUS_PER_NODE > 0 ? GPUS_PER_NODE : 1 ))
MAIN_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MAIN_ADDR=$(scontrol show node "$MAIN_NODE" | sed -n 's/.*NodeAddr=\\([^ ]*\\).*/\\1/p')
export MAIN_PORT=$(( 20000 + SLURM_JOB_ID % 20000 ))

# Stop (and save) STOP_BEFORE_END_S before the job's end, signal or not: the run's wall-time budget is what is left.
if [ "$STOP_BEFORE_END_S" -gt 0 ]; then
    LEFT=$(squeue -h -j "$JOB_ID" -o %L | awk -F'[-:]' \\
        '{{n=NF; s=$n+60*$(n-1); if (n>2) s+=3600*$(n-2); if (n>3) s+=86400*$(n-3); print s}}')
    TRAIN_ARGS+=("train.max_time_s=$(( LEFT > STOP_BEFORE_END_S ? LEFT - STOP_BEFORE_END_S : 1 ))")
fi

mkdir -p "$RUN_DIR/slurm"
rm -f "$RUN_DIR/last_run.json"
RESTART=${{SLURM_RESTART_COUNT:-0}}
log_event() {{  # a JSON line per start, requeue and cancel
    printf '{{"event": "%s", "job": %s, "restart": %s, %s"time": "%s"}}\\n' \\
        "$1" "$JOB_JSON" "$RESTART" "$2" "$(date -Is)" >> "$RUN_DIR/slurm/{attempts_file}"
}}
log_event start "\\"nodes\\": \\"$SLURM_JOB_NODELIST\\", "

# SLURM's warning before the end (USR1) reaches this script; SIGTERM comes at the job's end (time limit, preemption,
# scancel) to this script and the tasks alike. Both only create the stop file: every process stops after the same
# step and saves. (A signal handler that saved could fail intermittently.) How the job is ending is read when the
# TERM arrives: `scancel` leaves it COMPLETING with Reason=None, the time limit with Reason=TimeLimit.
ENDING=""
on_term() {{
    touch "$RUN_DIR/STOP"
    ENDING=$(squeue -h -j "$JOB_ID" -o "%T %r" 2>/dev/null)
}}
trap 'touch "$RUN_DIR/STOP"' USR1
trap on_term TERM

# Each node's task starts its processes (`launcher train --processes`), restarts them after a failure
# (slurm.max_restarts) and says a failure in one line.
srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c \\
    'exec "$0" -m launcher train "$@" resume=auto --processes "$PROCS_PER_NODE" --max-restarts "$MAX_RESTARTS" \\
        --nodes "$SLURM_NNODES" --node-rank "$SLURM_NODEID" --master-addr "$MAIN_ADDR" --master-port "$MAIN_PORT"' \\
    "$PYTHON" "${{TRAIN_ARGS[@]}}" &
SRUN=$!
while kill -0 "$SRUN" 2>/dev/null; do  # a trapped signal ends `wait` early; wait again until srun has ended
    wait "$SRUN"
done
wait "$SRUN"  # srun's own status: an interrupted `wait` gives 128 + the signal's number instead
STATUS=$?
rm -f "$RUN_DIR/STOP"  # the run has stopped; left behind, it would stop the next run here at its first step

REASON=$($PYTHON -c 'import json, sys; print(json.load(open(sys.argv[1]))["stop_reason"])' "$RUN_DIR/last_run.json" \\
    2>/dev/null || echo "crashed")
case "$REASON" in  # the run stopped and saved to be continued (the rest: done, early stopping, diverged, crashed)
    "stop file" | SIGTERM | SIGUSR1 | SIGINT | "max_time_s reached") SAVED=1 ;;
    *) SAVED=0 ;;
esac
# After a TERM a task may exit 143 (SLURM signals the tasks too) although the run saved: its record decides.
[ "$SAVED" -eq 1 ] && [ -n "$ENDING" ] && STATUS=0
if [ "$ENDING" = "COMPLETING None" ] || [ "$ENDING" = "CANCELLED None" ]; then  # scancel: the user's decision
    log_event cancel "\\"reason\\": \\"$REASON\\", "
    echo "launcher: job cancelled, run stopped ($REASON): not requeued" >&2
elif [ "$STATUS" -eq 0 ] && [ "$SAVED" -eq 1 ]; then
    if [ "$RESTART" -lt "$MAX_REQUEUES" ]; then
        log_event requeue "\\"reason\\": \\"$REASON\\", \\"ending\\": \\"$ENDING\\", "
        scontrol requeue "$JOB_ID"
    else
        echo "launcher: stopped ($REASON) after $RESTART requeues (slurm.max_requeues=$MAX_REQUEUES): not requeued" >&2
    fi
fi
exit "$STATUS"
"""
