"""The launcher's cost per step against hand-written loops: same model, data, batch, optimizer and steps.

For each workload and number of processes, every variant runs as fresh processes, the variants alternating so
that drifts of the machine hit them alike. Each variant runs twice per repeat:
- for N steps: steps/s are those from step 10 to step N, timed by the run itself (the launcher's metrics.jsonl
  rows carry the time they were written; the hand-written loops write the same rows for the harness), so start-up,
  the first steps' warm-up and shutdown stay out of them; and the peak resident memory of the largest process;
- for 1 step: the time from the command to the end of the first optimizer step.
Medians over the repeats.

Variants: `torch` (a minimal PyTorch loop; DDP with 2 processes), `accelerate` (the same loop with Accelerate),
`lightning` (Lightning's Trainer, when installed: `pip install -e ".[bench]"`) and `launcher` (`launcher train` on
the equivalent recipe, logging every 10 steps, progress bar on). Two processes are started by torchrun for every
variant and meet over gloo.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench.workloads import REPO, Workload

VARIANTS = ("torch", "accelerate", "lightning", "launcher")
NAMES = {
    "torch": "PyTorch loop",
    "accelerate": "Accelerate loop",
    "lightning": "Lightning Trainer",
    "launcher": "`launcher train`",
}


@dataclass
class Figures:
    rates: list[float] = field(default_factory=list)  # steps/s
    first_step: list[float] = field(default_factory=list)  # s from the command to the first step's end
    peak_rss: list[float] = field(default_factory=list)  # MiB, the largest process


def available_variants() -> list[str]:
    return [v for v in VARIANTS if v != "lightning" or importlib.util.find_spec("lightning") is not None]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(
    variant: str, w: Workload, steps: int, processes: int, text: Path, folder: Path, precision: str = "fp32"
) -> list[str]:
    if processes > 1:
        start = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}"]
        start += ["--master_addr=127.0.0.1", f"--master_port={_port()}", "-m"]
    else:
        start = [sys.executable, "-m"]
    if variant == "launcher":
        recipe = folder / f"workload_{w.key}.yaml"
        recipe.write_text(w.recipe())
        bf16 = ["train.mixed_precision=bf16"] if precision == "bf16" else []
        run = [f"run_dir={folder / 'run'}", f"train.max_steps={steps}", *bf16]
        return [*start, "launcher", "train", str(recipe), *run]
    return [*start, "bench.loops", variant, w.key, str(steps), "--text", str(text), "--precision", precision]


def run_once(cmd: list[str], folder: Path, threads: int | None = None) -> tuple[float, float, float]:
    """(steps/s from step 10 to the last, seconds from the command to the first step's end, peak RSS in MiB of
    the largest process); `threads`: torch's threads in the run (OMP_NUM_THREADS, which torch reads at start)."""
    mark, steps_file = folder / "first_step", folder / "steps.jsonl"
    env = {
        **os.environ,
        **({"OMP_NUM_THREADS": str(threads)} if threads else {}),
        "BENCH_FIRST_STEP_FILE": str(mark),
        "BENCH_STEPS_FILE": str(steps_file),
        "BENCH_RUN_DIR": str(folder / "run"),
    }
    log = folder / "stderr.log"
    with log.open("w") as err:
        start = time.time()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=err)
        # wait4's usage covers the process and every descendant it waited for: the peak is the largest of them.
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{log.read_text()[-3000:]}")
    if not steps_file.exists():  # the launcher: its own metrics rows (a hand-written loop's 1-step run: none)
        steps_file = folder / "run" / "metrics.jsonl"
    rows = steps_file.read_text().splitlines() if steps_file.exists() else []
    times = {row["step"]: row["time"] for row in map(json.loads, rows)}
    rate = math.nan
    if len(times) >= 2:
        first_row, last_row = min(times), max(times)
        rate = (last_row - first_row) / max(times[last_row] - times[first_row], 1e-9)
    # The launcher's 1-step run writes its one row at the end of step 1.
    first = float(mark.read_text()) if mark.exists() else times[min(times)]
    return rate, first - start, usage.ru_maxrss / 1024


def run_retrying(
    make_command: Callable[[Path], list[str]], tries: int = 2, threads: int | None = None
) -> tuple[float, float, float]:
    """A run, started again if it fails (a crash of a hand-written loop at exit should not lose an hour of
    figures); the last failure if every try fails."""
    for attempt in range(tries):
        with tempfile.TemporaryDirectory(prefix="launcher-bench-") as tmp:
            try:
                return run_once(make_command(Path(tmp)), Path(tmp), threads)
            except RuntimeError as e:
                if attempt == tries - 1:
                    raise
                print(f"bench: a run failed, starting it again: {str(e).splitlines()[0]}", file=sys.stderr)
    raise AssertionError("unreachable")


def measure(
    w: Workload, processes: int, steps: int, repeats: int, text: Path, variants: list[str], precision: str = "fp32"
) -> dict[str, Figures]:
    if "torch" in sys.modules:
        raise RuntimeError("bench: torch is imported in the harness: every run's peak memory would include its size")
    figures = {v: Figures() for v in variants}
    for _ in range(repeats):
        for variant in variants:  # alternating
            runs = []
            for n in (1, steps):
                make = functools.partial(command, variant, w, n, processes, text, precision=precision)
                runs.append(run_retrying(make, threads=w.threads))
            (_, first, _), (rate, _, rss) = runs
            f = figures[variant]
            f.rates.append(rate)
            f.first_step.append(first)
            f.peak_rss.append(rss)
    return figures


def table(w: Workload, processes: int, steps: int, repeats: int, figures: dict[str, Figures]) -> str:
    base = statistics.median(figures["torch"].rates)
    lines = [
        f"Workload ({w.key}), {processes} process{'es' if processes > 1 else ''}: {w.title}; "
        f"{steps} steps, medians of {repeats}.",
        "",
        "| variant | steps/s | samples/s | vs PyTorch | overhead per step | command to first step | peak RSS |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for variant, f in figures.items():
        rate = statistics.median(f.rates)
        lines.append(
            f"| {NAMES[variant]} | {rate:,.1f} | {rate * w.batch_size * processes:,.0f} | {rate / base:.2f}x | "
            f"{(1 / rate - 1 / base) * 1000:+.2f} ms | {statistics.median(f.first_step):.1f} s | "
            f"{statistics.median(f.peak_rss):,.0f} MiB |"
        )
    return "\n".join(lines)


def ratios(figures: dict[str, Figures]) -> dict[str, float]:
    base = statistics.median(figures["torch"].rates)
    return {v: statistics.median(f.rates) / base for v, f in figures.items()}


def dump(path: Path, results: dict[str, dict[str, Figures]]) -> None:
    """The raw figures of every run, to look at their spread."""
    path.write_text(json.dumps({k: {v: vars(f) for v, f in r.items()} for k, r in results.items()}, indent=1))
