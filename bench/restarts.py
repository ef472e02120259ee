"""python -m bench.restarts: what starting the processes through `launcher train --processes` costs against
`accelerate launch` and `torchrun`, and what a restart after a lost process costs.

The quickstart recipe on two CPU processes over gloo in bf16 autocast, a fixed number of updates with a checkpoint
every 100; each launcher's wall time from the command to its exit (start-up, recipe checks, rendezvous, training,
saves), the median of a few runs. Then the same run under `--max-restarts 1` with one process SIGKILLed from
outside once the checkpoint at step 100 is complete: its extra wall time over the uninterrupted run is what the
failure cost (the agent noticing, the grace for the others, a new rendezvous and start, the resume, and the updates
since the checkpoint done again), and its final val/loss is compared with the uninterrupted run's. Prints a
Markdown table for docs/benchmarks.md.

    python -m bench.restarts [--steps 400] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "quickstart.yaml"
LAUNCHERS = {
    "accelerate launch --multi_gpu --num_processes 2": [
        "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--main_process_port", "0",
        "-m", "launcher",
    ],
    "torchrun --standalone --nproc_per_node 2": ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                                                 "-m", "launcher"],
    "launcher train --processes 2": ["-m", "launcher"],
}  # fmt: skip


def overrides(run_dir: Path, steps: int) -> list[str]:
    return [
        f"run_dir={run_dir}", f"train.max_steps={steps}", "~train.max_epochs", "~early_stopping",
        "train.mixed_precision=bf16", "checkpoint.every_steps=100", "eval.every_steps=100",
        "logging.progress_bar=false",
    ]  # fmt: skip


def command(launcher: str, run_dir: Path, steps: int, *extra: str) -> list[str]:
    train = ["train", str(RECIPE), *overrides(run_dir, steps)]
    own = ["--processes", "2", *extra] if launcher.startswith("launcher") else []
    return [sys.executable, *LAUNCHERS[launcher], *train, *own]


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def final_val_loss(run_dir: Path) -> float:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["val/loss"] for r in rows if "val/loss" in r][-1]


def timed(cmd: list[str]) -> float:
    began = time.perf_counter()
    subprocess.run(cmd, env=env(), check=True, capture_output=True, text=True, timeout=900)
    return time.perf_counter() - began


def killed_once(run_dir: Path, steps: int) -> tuple[float, float]:
    """Wall time and final val/loss of a run that loses a process right after its checkpoint at step 100."""
    began = time.perf_counter()
    agent = subprocess.Popen(
        command("launcher train --processes 2", run_dir, steps, "--max-restarts", "1"),
        env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    state = run_dir / "checkpoints" / "step_00000100" / "trainer_state.json"
    while not state.is_file():
        if agent.poll() is not None:
            raise RuntimeError(agent.communicate()[1])
        time.sleep(0.01)
    workers = subprocess.run(["pgrep", "-P", str(agent.pid)], capture_output=True, text=True).stdout.split()
    os.kill(int(workers[-1]), signal.SIGKILL)
    _, err = agent.communicate(timeout=900)
    if agent.returncode != 0 or "restarting the processes" not in err:
        raise RuntimeError(err)
    return time.perf_counter() - began, final_val_loss(run_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rows, losses = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in LAUNCHERS:
            seconds = []
            for i in range(args.repeats):
                run_dir = Path(tmp) / f"{len(rows)}-{i}"
                seconds.append(timed(command(name, run_dir, args.steps)))
                losses[name] = final_val_loss(run_dir)
            rows.append((name, statistics.median(seconds), seconds))
        killed = [killed_once(Path(tmp) / f"killed-{i}", args.steps) for i in range(args.repeats)]
    base = rows[0][1]
    print(f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; {args.steps} updates, "
          f"median of {args.repeats} runs.\n")  # fmt: skip
    print("| start | wall time (median) | runs | against accelerate launch | final val/loss |")
    print("| --- | --- | --- | --- | --- |")
    for name, median, seconds in rows:
        runs = ", ".join(f"{s:.1f}" for s in seconds)
        print(f"| `{name}` | {median:.1f} s | {runs} s | {median / base:.2f}x | {losses[name]:.6f} |")
    ours = rows[-1][1]
    for seconds, loss in killed:
        print(f"| `--max-restarts 1`, one process SIGKILLed after step 100 | {seconds:.1f} s | | "
              f"+{seconds - ours:.1f} s over `--processes 2` | {loss:.6f} |")  # fmt: skip


if __name__ == "__main__":
    main()
