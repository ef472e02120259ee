"""SLURM: the job script a recipe runs under, `launcher slurm submit` and `launcher slurm status`.

The script asks for one task per node; each runs `accelerate launch` with its node's rank, the first node's address
and a port derived from the job id. SLURM's warning before the end (`--signal=B:USR1@...`) and SIGTERM reach the
batch script, which only creates the run's stop file: every process then stops at the same step and saves (the
loop's consensus), and the script requeues the job (`scontrol requeue`) up to `slurm.max_requeues` times; the
requeued job continues with `resume=auto`. Rendering is a pure function of the recipe and the options.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher.errors import RecipeError
from launcher.layout import CHECKPOINTS_DIR, LAST_RUN_FILE, RECIPE_FILE, SLURM_ATTEMPTS_FILE, read_json, read_jsonl

_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")
TIME_FORMATS = "HH:MM:SS, MM:SS, MM or D-HH:MM:SS"
MAX_SIGNAL_TIME_S = 65535  # the most seconds before its end that SLURM can warn a job (--signal=...@time)


def parse_time(text: str) -> int:
    """SLURM's time formats (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS) in seconds; ValueError otherwise."""
    match = _TIME.match(text.strip())
    if not match or text.strip() != text or not text:
        raise ValueError(text)
    days, a, b, c = match.groups()
    parts = [int(x) for x in (a, b, c) if x is not None]
    if days is not None:  # D-HH[:MM[:SS]]
        hours, minutes, seconds = [*parts, 0, 0][:3]
        return ((int(days) * 24 + hours) * 60 + minutes) * 60 + seconds
    if len(parts) == 1:
        return parts[0] * 60  # MM
    if len(parts) == 2:
        return parts[0] * 60 + parts[1]  # MM:SS
    return (parts[0] * 60 + parts[1]) * 60 + parts[2]


@dataclass(frozen=True)
class JobOptions:
    nodes: int
    gpus_per_node: int
    time: str
    partition: str | None = None
    account: str | None = None
    max_requeues: int = 3
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


def _header(o: JobOptions, run_dir: str, name: str, own_output: bool) -> list[str]:
    """The #SBATCH lines."""
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
        *([f"#SBATCH --output={run_dir}/slurm/%j.out"] if own_output else []),
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
    o = options
    header = _header(options, run_dir, name, train_args is not None)
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
    body = JOB_BODY.format(
        about=about,
        workdir=workdir,
        python=python,
        args="\n".join(args_lines),
        max_requeues=o.max_requeues,
        stop_before_end_s=o.stop_before_end_s,
        setup="\n".join(o.setup),
        attempts_file=SLURM_ATTEMPTS_FILE,
    )
    return "\n".join(header) + "\n" + body


def find_sbatch() -> str:
    """sbatch's path; RecipeError when it is not on PATH."""
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise RecipeError("sbatch: not found on PATH; run this on a SLURM login node, or use --dry-run")
    return sbatch


def submit(sbatch: str, script: Path) -> str:
    """Submit with sbatch; the job id. RecipeError when sbatch refuses."""
    proc = subprocess.run([sbatch, "--parsable", str(script)], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        detail = " ".join((proc.stderr or proc.stdout).split())
        raise RecipeError(f"sbatch: refused {script}: {detail}")
    return proc.stdout.strip().split(";")[0]


def status(run_dir: Path) -> dict[str, Any]:
    """Which job runs the run, how often it was requeued, its last checkpoint and how its last attempt ended."""
    from launcher import checkpoint
    from launcher.recipe import load_recipe

    attempts_file = run_dir / "slurm" / SLURM_ATTEMPTS_FILE
    if not attempts_file.is_file():
        raise RecipeError(f"{run_dir}: no SLURM job has run here (no slurm/{SLURM_ATTEMPTS_FILE})")
    events = read_jsonl(attempts_file)  # a line cut short by a node dying mid-append is skipped
    starts = [e for e in events if e.get("event") == "start"]
    requeues = [e for e in events if e.get("event") == "requeue"]
    job = events[-1].get("job") if events else None
    job = None if job is None else str(job)
    state = None
    if job and shutil.which("squeue"):
        proc = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True, check=False)
        state = proc.stdout.strip() or None
    recipe_file = run_dir / RECIPE_FILE
    ckpt_dir = run_dir / CHECKPOINTS_DIR
    if recipe_file.is_file():
        ckpt_dir = load_recipe(recipe_file, check_files=False, this_machine=False).checkpoint_dir
    last_checkpoint = checkpoint.latest(ckpt_dir)
    return {
        "job": job,
        "state": state or "not in the queue",
        "attempts": len(starts),
        "requeues": len(requeues),
        "last_checkpoint": str(last_checkpoint) if last_checkpoint else None,
        "last_run": read_json(run_dir / LAST_RUN_FILE) or None,
    }


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
STOP_BEFORE_END_S={stop_before_end_s}
{setup}

# One process per GPU the allocation gives each node; one CPU process (over gloo) where it gives none.
GPUS_PER_NODE=${{SLURM_GPUS_ON_NODE:-0}}
PROCS_PER_NODE=$(( GPUS_PER_NODE > 0 ? GPUS_PER_NODE : 1 ))
export NUM_PROCESSES=$(( SLURM_NNODES * PROCS_PER_NODE ))
MAIN_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MAIN_ADDR=$(scontrol show node "$MAIN_NODE" | sed -n 's/.*NodeAddr=\\([^ ]*\\).*/\\1/p')
export MAIN_PORT=$(( 20000 + SLURM_JOB_ID % 20000 ))

# Stop (and save) STOP_BEFORE_END_S before the job's end, signal or not: the run's wall-time budget is what is left.
if [ "$STOP_BEFORE_END_S" -gt 0 ]; then
    LEFT=$(squeue -h -j "$SLURM_JOB_ID" -o %L | awk -F'[-:]' \\
        '{{n=NF; s=$n+60*$(n-1); if (n>2) s+=3600*$(n-2); if (n>3) s+=86400*$(n-3); print s}}')
    TRAIN_ARGS+=("train.max_time_s=$(( LEFT > STOP_BEFORE_END_S ? LEFT - STOP_BEFORE_END_S : 1 ))")
fi

mkdir -p "$RUN_DIR/slurm"
rm -f "$RUN_DIR/last_run.json"
RESTART=${{SLURM_RESTART_COUNT:-0}}
log_event() {{  # a JSON line per start and requeue
    printf '{{"event": "%s", "job": %s, "restart": %s, %s"time": "%s"}}\\n' \\
        "$1" "$SLURM_JOB_ID" "$RESTART" "$2" "$(date -Is)" >> "$RUN_DIR/slurm/{attempts_file}"
}}
log_event start "\\"nodes\\": \\"$SLURM_JOB_NODELIST\\", "

# SLURM's warning before the end (and SIGTERM) reach this script: it asks the run to stop through its stop file,
# and every process stops after the same step and saves. (A signal handler that saved could fail intermittently.)
trap 'touch "$RUN_DIR/STOP"' USR1 TERM

srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c \\
    '[ "$NUM_PROCESSES" -eq 1 ] && exec "$0" -m launcher train "$@" resume=auto
    exec "$0" -m accelerate.commands.launch --multi_gpu --num_machines "$SLURM_NNODES" --machine_rank "$SLURM_NODEID" \\
        --num_processes "$NUM_PROCESSES" --main_process_ip "$MAIN_ADDR" --main_process_port "$MAIN_PORT" \\
        --mixed_precision no --dynamo_backend no -m launcher train "$@" resume=auto' \\
    "$PYTHON" "${{TRAIN_ARGS[@]}}" &
SRUN=$!
while true; do  # `wait` returns early when a trapped signal arrives; wait again until srun has ended
    wait "$SRUN"
    STATUS=$?
    kill -0 "$SRUN" 2>/dev/null || break
done

REASON=$($PYTHON -c 'import json, sys; print(json.load(open(sys.argv[1]))["stop_reason"])' "$RUN_DIR/last_run.json" \\
    2>/dev/null || echo "crashed")
if [ "$STATUS" -eq 0 ] && [ "$REASON" != "done" ] && [ "$REASON" != "early stopping" ]; then
    if [ "$RESTART" -lt "$MAX_REQUEUES" ]; then
        log_event requeue "\\"reason\\": \\"$REASON\\", "
        scontrol requeue "$SLURM_JOB_ID"
    else
        echo "launcher: stopped ($REASON) after $RESTART requeues (slurm.max_requeues=$MAX_REQUEUES): not requeued" >&2
    fi
fi
exit "$STATUS"
"""
