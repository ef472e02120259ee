"""What sampling and weight decay do to the char transformer (`python -m bench --parts sampling`).

`recipes/charlm.yaml` on Tiny Shakespeare, as it is but without early stopping and with every evaluation over the
whole val split (`eval.max_batches=null`), so that every variant trains the same number of updates and its figures
compare: the final and the best val/loss, and the run's wall time. The variants:

- the recipe: fixed block offsets, weight decay on every parameter (`optimizer.decay=all`);
- random block offsets (`data.dataset.offsets=random`): each epoch's blocks shifted by a new offset;
- weight decay on the weight matrices only (`optimizer.decay=matrices`);
- both.

A launcher without `optimizer.decay` (its `launcher validate` refuses the key) runs the first two only, without
the override: its AdamW decays every parameter, as `decay: all` does. Every run is a fresh `launcher train`, one
after the other; the harness does not import torch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.workloads import REPO, SHAKESPEARE

RECIPE = REPO / "recipes" / "charlm.yaml"
# name -> (data.dataset.offsets, optimizer.decay)
VARIANTS = {
    "the recipe (fixed offsets, decay on all)": ("fixed", "all"),
    "random offsets": ("random", "all"),
    "decay on matrices only": ("fixed", "matrices"),
    "both": ("random", "matrices"),
}


@dataclass(frozen=True)
class Plan:
    steps: int
    eval_every: int
    seeds: tuple[int, ...]


FULL = Plan(2000, 250, (1337,))
QUICK = Plan(20, 20, (1337,))  # a smoke run: one evaluation, at the end


@dataclass(frozen=True)
class Result:
    final: float  # the last val/loss, at the last update
    best: float
    seconds: float


def overrides(text: Path, plan: Plan, seed: int, offsets: str, decay: str | None) -> list[str]:
    """The variant's overrides of the recipe; `decay` None: the launcher has no `optimizer.decay`."""
    return [
        f"data.dataset.path={text}",
        f"data.dataset.offsets={offsets}",
        *([f"optimizer.decay={decay}"] if decay else []),
        "~early_stopping",  # every variant trains the whole budget
        f"train.max_steps={plan.steps}",
        f"train.seed={seed}",
        f"eval.every_steps={plan.eval_every}",
        "eval.max_batches=null",  # the whole val split, every evaluation
        "logging.progress_bar=false",
    ]


def launcher(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "launcher", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False)


def has_decay(text: Path, folder: Path) -> bool:
    """Whether this launcher takes `optimizer.decay` (its validation says so, building nothing)."""
    proc = launcher("validate", str(RECIPE), f"data.dataset.path={text}", "optimizer.decay=matrices", cwd=folder)
    return proc.returncode == 0


def train(folder: Path, args: list[str]) -> Result:
    """One run in a fresh process; RuntimeError when it fails."""
    start = time.time()
    proc = launcher("train", str(RECIPE), f"run_dir={folder / 'run'}", *args, cwd=folder)
    seconds = time.time() - start
    if proc.returncode != 0:
        raise RuntimeError(f"launcher train {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (folder / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["val/loss"] for r in rows if "val/loss" in r]
    return Result(losses[-1], min(losses), seconds)


def table(results: dict[tuple[str, int], Result], seeds: tuple[int, ...]) -> str:
    head = "| variant | seed | final val/loss | best val/loss | time |\n| --- | --- | --- | --- | --- |"
    rows = [
        f"| {name} | {seed} | {r.final:.4f} | {r.best:.4f} | {r.seconds:.0f} s |"
        for name in VARIANTS
        for seed in seeds
        if (r := results.get((name, seed)))
    ]
    return "\n".join([head, *rows])


def measure(quick: bool, text: Path = SHAKESPEARE, seeds: tuple[int, ...] | None = None) -> str:
    """The sampling part's Markdown."""
    plan = QUICK if quick else FULL
    seeds = seeds or plan.seeds
    if not text.is_file():
        return f"Left out: {text} does not exist (give --text FILE)."
    results: dict[tuple[str, int], Result] = {}
    with tempfile.TemporaryDirectory(prefix="launcher-bench-sampling-", dir=os.environ.get("BENCH_DIR")) as tmp:
        decay = has_decay(text, Path(tmp))
        for seed in seeds:
            for name, (offsets, how) in VARIANTS.items():
                if how != "all" and not decay:
                    continue
                print(f"sampling: {name}, seed {seed}, {plan.steps} updates", file=sys.stderr, flush=True)
                folder = Path(tempfile.mkdtemp(dir=tmp))
                results[name, seed] = train(folder, overrides(text, plan, seed, offsets, how if decay else None))
    shape = f"{plan.steps} updates of 16 x 64 characters, an evaluation every {plan.eval_every}"
    notes = [] if decay else ["This launcher has no `optimizer.decay`: the rows that need it are left out."]
    return "\n\n".join([f"`recipes/charlm.yaml`, {shape}; one process.", table(results, seeds), *notes])
