"""The launcher's cost per step against hand-written loops: same model, data, batch, optimizer and steps.

For each workload and number of processes, every variant runs as fresh processes, the variants alternating so
that drifts of the machine hit them alike. Each variant runs twice per repeat, for 1 step and for N steps: the
difference of the wall times is the time of N - 1 steps without start-up or shutdown, so steps/s compare the loops
alone. Also measured: the time from the command to the end of the first optimizer step (in the 1-step run) and
the peak resident memory of the largest process (in the N-step run). Medians over the repeats.

Variants: `torch` (a minimal PyTorch loop; DDP with 2 processes), `accelerate` (the same loop with Accelerate),
`lightning` (Lightning's Trainer, when installed: `pip install -e ".[bench]"`) and `launcher` (`launcher train` on
the equivalent recipe, logging every 10 steps, progress bar on). Two processes are started by torchrun for every
variant and meet over gloo.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
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


def command(variant: str, w: Workload, steps: int, processes: int, text: Path, folder: Path) -> list[str]:
    if processes > 1:
        start = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}"]
        start += ["--master_addr=127.0.0.1", f"--master_port={_port()}", "-m"]
    else:
        start = [sys.executable, "-m"]
    if variant == "launcher":
        recipe = folder / f"workload_{w.key}.yaml"
        recipe.write_text(w.recipe())
        return [*start, "launcher", "train", str(recipe), f"run_dir={folder / 'run'}", f"train.max_steps={steps}"]
    return [*start, "bench.loops", variant, w.key, str(steps), "--text", str(text)]


def run_once(cmd: list[str], folder: Path) -> tuple[float, float, float]:
    """(wall seconds, seconds from start to the first step's end, peak RSS in MiB of the largest process)."""
    mark = folder / "first_step"
    env = {**os.environ, "BENCH_FIRST_STEP_FILE": str(mark), "BENCH_RUN_DIR": str(folder / "run")}
    log = folder / "stderr.log"
    with log.open("w") as err:
        wall_start, start = time.time(), time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=err)
        # wait4's usage covers the process and every descendant it waited for: the peak is the largest of them.
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{log.read_text()[-3000:]}")
    metrics = folder / "run" / "metrics.jsonl"  # the launcher's first row is written at the end of step 1
    first = float(mark.read_text()) if mark.exists() else metrics.stat().st_mtime
    return wall, first - wall_start, usage.ru_maxrss / 1024


def measure(
    w: Workload, processes: int, steps: int, repeats: int, text: Path, variants: list[str]
) -> dict[str, Figures]:
    figures = {v: Figures() for v in variants}
    for _ in range(repeats):
        for variant in variants:  # alternating
            runs = []
            for n in (1, steps):
                with tempfile.TemporaryDirectory(prefix="launcher-bench-") as tmp:
                    runs.append(run_once(command(variant, w, n, processes, text, Path(tmp)), Path(tmp)))
            (one, first, _), (full, _, rss) = runs
            f = figures[variant]
            f.rates.append((steps - 1) / max(full - one, 1e-9))
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
