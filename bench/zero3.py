"""ZeRO-3 and tensor parallelism against FSDP2 on the same model (`python -m bench.zero3`): steps/s of
`launcher train` on 2 processes.

The workload: the GPT recipes made CPU-sized (4 layers, 128 wide, 4 heads, blocks of 64 byte tokens of Tiny
Shakespeare, 8 per process, bf16 autocast, no evaluation or checkpoints), trained by `recipes/gpt_fsdp.yaml` and
`recipes/gpt_zero3.yaml` with the same overrides. Variants:

- `fsdp`: FSDP2, each `Block` a unit;
- `zero3`: DeepSpeed ZeRO-3 with the config the launcher generates (see `launcher plan`);
- `zero3-ds`: ZeRO-3 with DeepSpeed's own built-in values for the settings the launcher now chooses (buckets,
  persistence threshold, live parameters, reuse distance), given as a user's JSON: the config the launcher
  generated before it chose them;
- `tp`: the FSDP2 recipe with every process in one tensor-parallel group (`strategy.tp` = the processes), each
  reading the whole global batch (8 x processes samples), so that every variant's update sees the same samples.

Every run is fresh processes started by torchrun, meeting over gloo; the variants alternate within each round so
that drifts of a shared machine hit them alike; steps/s are timed by the run itself from step 10 to the last (its
metrics.jsonl rows carry their time, as in bench/overhead.py), so start-up stays out; medians over the rounds.

`--profile` instead runs each variant once with the launcher's `profile` section (torch.profiler, updates 21-25,
every rank) and prints, for rank 0, the milliseconds per update spent in the collectives and how many of each
run per update. Options: `--rounds 3 --steps 60 --variants fsdp,zero3,zero3-ds --text PATH`.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

from bench.workloads import REPO, SHAKESPEARE, TRAIN_ONLY

WORKLOAD = (
    "data.dataset.vocab_size=256",
    "data.dataset.block_size=64",
    "model.n_layer=4",
    "model.n_head=4",
    "model.n_embd=128",
    "train.batch_size=8",
    "train.gradient_accumulation_steps=1",
    "train.mixed_precision=bf16",
    "scheduler.warmup_steps=5",
    "logging.every_steps=10",
    "logging.progress_bar=false",
    *TRAIN_ONLY,
)
# DeepSpeed 0.19's own values (deepspeed/runtime/zero/config.py) for what the launcher sets: the earlier config.
DEEPSPEED_BUILT_IN = {
    "zero_optimization": {
        "reduce_bucket_size": 500_000_000,
        "allgather_bucket_size": 500_000_000,
        "stage3_prefetch_bucket_size": 50_000_000,
        "stage3_param_persistence_threshold": 100_000,
        "stage3_max_live_parameters": 1_000_000_000,
        "stage3_max_reuse_distance": 1_000_000_000,
        "overlap_comm": True,
        "contiguous_gradients": True,
    }
}
VARIANTS = ("fsdp", "zero3", "zero3-ds", "tp")
PROFILE_STEPS = (21, 5)  # first recorded update, updates recorded
COLLECTIVES = ("all_gather", "allgather", "reduce_scatter", "all_reduce", "allreduce", "broadcast", "barrier")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(variant: str, folder: Path, tokens: Path, steps: int, processes: int, profile: bool) -> list[str]:
    recipe = REPO / "recipes" / ("gpt_zero3.yaml" if variant.startswith("zero3") else "gpt_fsdp.yaml")
    extra = [f"data.dataset.path={tokens}/{{split}}.bin", f"run_dir={folder / 'run'}", f"train.max_steps={steps}"]
    if variant == "tp":
        extra += [f"strategy.tp={processes}", f"train.batch_size={8 * processes}"]
    if variant == "zero3-ds":
        user = folder / "deepspeed.json"
        user.write_text(json.dumps(DEEPSPEED_BUILT_IN))
        extra.append(f"strategy.deepspeed.config={user}")
    if profile:
        start, n = PROFILE_STEPS
        extra.append(f"profile={{start_step: {start}, steps: {n}, ranks: all}}")
    start_cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}"]
    start_cmd += ["--master_addr=127.0.0.1", f"--master_port={_port()}", "-m"]
    return [*start_cmd, "launcher", "train", str(recipe), *WORKLOAD, *extra]


def run(cmd: list[str], folder: Path) -> Path:
    """The run's folder, once it has finished."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    log = folder / "output.log"
    with log.open("w") as out:
        code = subprocess.call(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    if code != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {code}:\n{log.read_text()[-3000:]}")
    return folder / "run"


def rate(run_dir: Path) -> float:
    """Steps/s from the first logged step (10) to the last, as the run timed them."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    times = {row["step"]: row["time"] for row in rows if "time" in row}
    first, last = min(times), max(times)
    return (last - first) / (times[last] - times[first])


def tokens_of(text: Path, folder: Path) -> Path:
    out = folder / "tokens"
    cmd = [sys.executable, "-m", "launcher", "tokenize", str(text), "--out", str(out)]
    subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    return out


def measure(variants: list[str], rounds: int, steps: int, processes: int, tokens: Path) -> dict[str, list[float]]:
    rates: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(rounds):
        for variant in variants:  # alternating, so that a busy minute of the machine hits every variant
            with tempfile.TemporaryDirectory(prefix="bench-zero3-") as tmp:
                rates[variant].append(
                    rate(run(command(variant, Path(tmp), tokens, steps, processes, False), Path(tmp)))
                )
            print(f"round {r + 1}: {variant} {rates[variant][-1]:.2f} steps/s", file=sys.stderr)
    return rates


def table(rates: dict[str, list[float]], steps: int, processes: int) -> str:
    base = statistics.median(rates["fsdp"]) if "fsdp" in rates else None
    lines = [
        f"{processes} processes, steps 10-{steps}, medians of {len(next(iter(rates.values())))} rounds",
        "",
        "| variant | steps/s (median) | runs | vs FSDP2 |",
        "| --- | --- | --- | --- |",
    ]
    for variant, found in rates.items():
        median = statistics.median(found)
        ratio = f"{median / base:.2f}x" if base else "-"
        lines.append(f"| {variant} | {median:.2f} | {', '.join(f'{x:.2f}' for x in found)} | {ratio} |")
    return "\n".join(lines)


def collectives(trace: Path, updates: int) -> dict[str, tuple[float, float]]:
    """(calls, ms) per update of each collective in a torch.profiler trace, by operator name; `step`: the
    recorded updates' total wall time per update."""
    events = json.loads(trace.read_text())["traceEvents"]
    calls: Counter[str] = Counter()
    ms: Counter[str] = Counter()
    for e in events:
        if e.get("ph") != "X" or e.get("cat") not in ("cpu_op", "user_annotation", None):
            continue
        name = str(e.get("name", ""))
        if name.startswith("ProfilerStep#"):
            calls["step"] += 1
            ms["step"] += e["dur"] / 1000
        elif any(c in name.lower() for c in COLLECTIVES) and name.startswith(("c10d::", "gloo:", "record_param_comms")):
            calls[name] += 1
            ms[name] += e["dur"] / 1000
    return {name: (calls[name] / updates, ms[name] / updates) for name in sorted(calls, key=lambda n: -ms[n])}


def profile(variants: list[str], processes: int, tokens: Path) -> str:
    start, n = PROFILE_STEPS
    lines = []
    for variant in variants:
        with tempfile.TemporaryDirectory(prefix="bench-zero3-") as tmp:
            run_dir = run(command(variant, Path(tmp), tokens, start + n + 4, processes, True), Path(tmp))
            trace = next((run_dir / "profile").glob("rank0.*.pt.trace.json"))
            lines.append(f"{variant} (rank 0, updates {start}-{start + n - 1}), per update:")
            for name, (count, ms) in collectives(trace, n).items():
                lines.append(f"  {name:<40} {count:6.1f} calls {ms:8.2f} ms")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.zero3", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--text", type=Path, default=SHAKESPEARE)
    parser.add_argument("--profile", action="store_true", help="collectives per update instead of steps/s")
    args = parser.parse_args(argv)
    variants = args.variants.split(",")
    if unknown := set(variants) - set(VARIANTS):
        parser.error(f"unknown variants {sorted(unknown)}; known: {', '.join(VARIANTS)}")
    with tempfile.TemporaryDirectory(prefix="bench-zero3-") as tmp:
        tokens = tokens_of(args.text, Path(tmp))
        if args.profile:
            print(profile(variants, args.processes, tokens))
        else:
            print(table(measure(variants, args.rounds, args.steps, args.processes, tokens), args.steps, args.processes))


if __name__ == "__main__":
    main()
