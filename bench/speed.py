"""The speed features' figures (`python -m bench --parts speed`): compilation, activation checkpointing, and the
cost of the profiler and of the FLOP counter.

Every run is a fresh process; what is compared alternates within each repeat, so drifts of the machine hit every
variant alike; medians over the repeats. Steps/s are timed inside each run from step 10 to the last (the launcher's
metrics.jsonl rows carry their time, the hand-written loop writes the same rows), so start-up, compilation and
shutdown stay out of them.

- Compile: workloads (b) and (g), each eager, compiled regional (`Module.compile` on each block) and compiled whole
  (`Module.compile` on the model), inductor, `launcher train` against the PyTorch loop of bench/loops.py compiled
  the same way. Compile time: the first step's time beyond the second's (the launcher's `compile_s`; the loop
  measures the same). Every variant has its own inductor cache (TORCHINDUCTOR_CACHE_DIR): empty in the first
  repeat (cold), reused in the others (warm). "To first step": from the command to the end of the first step,
  the time of the step-10 row less 9 steady steps.
- Activation checkpointing: workload (g) made larger (4 layers, 128 wide, batch 16 x 256), so that activations
  outweigh the process's fixed memory; `launcher train` with none, every 2nd block, every block; peak memory is
  the launcher's `memory/peak_gib` (on a CPU: the process's peak RSS).
- Profiler and FLOP counter: workload (b) by `launcher train`: without `profile` against the launcher before the
  profiler existed (the same loop: its cost when off), with `profile` recording steps, and with a model without a
  FLOPs formula (`bench.models.CountedGPT`: torch's counter runs on its first update; the GPT's formula counts
  nothing). The counter's cost on the update it runs on is measured in one process: updates with and without it,
  alternating, after 3 warm-up updates.

The harness does not import torch (a child's peak RSS would start from the harness's).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from bench.workloads import LOG_EVERY, REPO, SHAKESPEARE, Workload, workloads

MODES = {  # train.compile's value for each way of compiling
    "eager": "false",
    "regional": "{regional: true}",
    "whole": "{regional: false}",
}
MODE_NAMES = {"eager": "eager", "regional": "compiled, regional", "whole": "compiled, whole model"}
RECOMPUTE = {"none": "none", "every 2": "{every: 2}", "full": "full"}
LARGER = ("model.n_layer=4", "model.n_head=4", "model.n_embd=128", "data.dataset.block_size=256", "train.batch_size=16")
# The launcher as it was before the profiler: `profile` is off when it is left out, so a run without it is this one's.
PROFILER_BASE = "c11a311"


@dataclass(frozen=True)
class Plan:
    compile_steps: dict[str, int]
    compile_repeats: int
    recompute_steps: int
    recompute_repeats: int
    profile_steps: int
    profile_repeats: int
    profiled: int  # steps the profiler records
    counter_updates: int
    modes: tuple[str, ...] = tuple(MODES)
    backend: str = "inductor"
    larger: tuple[str, ...] = LARGER  # workload (g)'s overrides for activation checkpointing
    recompute: tuple[str, ...] = tuple(RECOMPUTE)
    before: bool = True  # the launcher before the profiler, too


FULL = Plan({"b": 150, "g": 150}, 2, 20, 2, 150, 3, 10, 7)
# A smoke run: workload (g) only, aot_eager (traces without generating kernels), no larger model, no older tree.
QUICK = Plan({"g": 20}, 1, 20, 1, 20, 1, 5, 2, ("eager", "regional"), "aot_eager", (), ("none", "full"), False)


@dataclass
class Run:
    rate: float  # steps/s from step 10 to the last
    first_step: float  # s from the command to the end of the first step
    compile_s: float | None
    peak_gib: float | None  # the launcher's memory/peak_gib


@dataclass
class Series:
    runs: list[Run] = field(default_factory=list)

    def median(self, name: str, runs: Iterable[Run] | None = None) -> float:
        values = [getattr(r, name) for r in (self.runs if runs is None else runs)]
        values = [v for v in values if v is not None and not math.isnan(v)]
        return statistics.median(values) if values else math.nan


def launcher_command(w: Workload, folder: Path, steps: int, overrides: Iterable[str] = ()) -> list[str]:
    recipe = folder / f"workload_{w.key}.yaml"
    recipe.write_text(w.recipe())
    return [
        sys.executable, "-m", "launcher", "train", str(recipe), *w.overrides, f"run_dir={folder / 'run'}",
        f"train.max_steps={steps}", *overrides,
    ]  # fmt: skip


def loop_command(w: Workload, steps: int, mode: str, backend: str, text: Path, tokens: Path) -> list[str]:
    how = {"eager": "none"}.get(mode, mode)
    return [sys.executable, "-m", "bench.loops", "torch", w.key, str(steps), "--text", str(text), "--tokens",
            str(tokens), "--compile", how, "--backend", backend]  # fmt: skip


def run(cmd: list[str], folder: Path, cache: Path | None = None, root: Path = REPO) -> Run:
    """One run in a fresh process, its figures; RuntimeError when it fails."""
    steps_file, compile_file = folder / "steps.jsonl", folder / "compile.json"
    env = {**os.environ, "BENCH_STEPS_FILE": str(steps_file), "BENCH_COMPILE_FILE": str(compile_file)}
    if root != REPO:  # another tree of the launcher: its code, not this one's
        env["PYTHONPATH"] = str(root)
    if cache is not None:
        env["TORCHINDUCTOR_CACHE_DIR"] = str(cache)
    log = folder / "stderr.log"
    with log.open("w") as err:
        start = time.time()
        proc = subprocess.run(cmd, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=err, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{log.read_text()[-3000:]}")
    rows_file = steps_file if steps_file.exists() else folder / "run" / "metrics.jsonl"
    rows = [json.loads(line) for line in rows_file.read_text().splitlines()]
    times = {r["step"]: r["time"] for r in rows if r["step"] % LOG_EVERY == 0 and "compile_s" not in r}
    first, last = min(times), max(times)
    rate = (last - first) / max(times[last] - times[first], 1e-9) if last > first else math.nan
    compile_s = next((r["compile_s"] for r in rows if "compile_s" in r), None)
    if compile_file.exists():
        compile_s = json.loads(compile_file.read_text())["compile_s"]
    peaks = [r["memory/peak_gib"] for r in rows if "memory/peak_gib" in r]
    return Run(rate, times[first] - start - (first - 1) / rate, compile_s, max(peaks) if peaks else None)


def fresh(parent: Path, name: str) -> Path:
    folder = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=parent))
    return folder


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def ratio_range(a: list[Run], b: list[Run]) -> str:
    ratios = sorted(x.rate / y.rate for x, y in zip(a, b, strict=True))
    return f"{ratios[0]:.2f}-{ratios[-1]:.2f}" if len(ratios) > 1 else f"{ratios[0]:.2f}"


def seconds(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.1f} s"


def compile_part(ws: list[Workload], plan: Plan, text: Path, tokens: Path, folder: Path) -> str:
    series = {(w.key, m, v): Series() for w in ws for m in plan.modes for v in ("torch", "launcher")}
    for repeat in range(plan.compile_repeats):
        for w in ws:
            steps = plan.compile_steps[w.key]
            for mode in plan.modes:
                value = MODES[mode] if mode == "eager" else f"{MODES[mode][:-1]}, backend: {plan.backend}}}"
                for variant in ("torch", "launcher"):  # alternating
                    cache = folder / f"inductor-{w.key}-{mode}-{variant}"  # empty in the first repeat: cold
                    tmp = fresh(folder, "run")
                    if variant == "launcher":
                        cmd = launcher_command(w, tmp, steps, [f"train.compile={value}"])
                    else:
                        cmd = loop_command(w, steps, mode, plan.backend, text, tokens)
                    r = run(cmd, tmp, cache)
                    series[w.key, mode, variant].runs.append(r)
                    say(f"compile ({w.key}) {mode} {variant} repeat {repeat + 1}: {r}")
    sections = []
    for w in ws:
        steps = plan.compile_steps[w.key]
        lines = [
            f"Workload ({w.key}), 1 process: {w.title}; {steps} steps, medians of {plan.compile_repeats}; "
            f"{plan.backend}, default mode. Compile time cold: the first repeat, each variant with an empty inductor "
            f"cache; warm: the other repeats, their caches filled.",
            "",
            "| way | `launcher train` steps/s | PyTorch loop steps/s | launcher vs PyTorch (range over repeats) | "
            "speed vs eager (launcher) | compile, cold: launcher / PyTorch | compile, warm: launcher / PyTorch | "
            "command to first step, cold: launcher / PyTorch |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        eager = series[w.key, "eager", "launcher"].median("rate")
        for mode in plan.modes:
            ours, theirs = series[w.key, mode, "launcher"], series[w.key, mode, "torch"]
            rate, base = ours.median("rate"), theirs.median("rate")
            cold = [s.runs[0] for s in (ours, theirs)]
            if mode == "eager":
                cold_compile = warm_compile = "-"
            else:
                cold_compile = f"{seconds(cold[0].compile_s or math.nan)} / {seconds(cold[1].compile_s or math.nan)}"
                warm_compile = (
                    f"{seconds(ours.median('compile_s', ours.runs[1:]))} / "
                    f"{seconds(theirs.median('compile_s', theirs.runs[1:]))}"
                )
            lines.append(
                f"| {MODE_NAMES[mode]} | {rate:,.1f} | {base:,.1f} | {rate / base:.2f}x "
                f"({ratio_range(ours.runs, theirs.runs)}) | {rate / eager:.2f}x | {cold_compile} | {warm_compile} | "
                f"{seconds(cold[0].first_step)} / {seconds(cold[1].first_step)} |"
            )
        sections.append("\n".join(lines))
    return "\n\n".join(sections)


def recompute_part(w: Workload, plan: Plan, folder: Path) -> str:
    series = {k: Series() for k in plan.recompute}
    for repeat in range(plan.recompute_repeats):
        for key in plan.recompute:
            tmp = fresh(folder, "run")
            overrides = [*plan.larger, f"train.activation_checkpointing={RECOMPUTE[key]}"]
            r = run(launcher_command(w, tmp, plan.recompute_steps, overrides), tmp)
            series[key].runs.append(r)
            say(f"activation checkpointing {key} repeat {repeat + 1}: {r}")
    base_rate, base_peak = series["none"].median("rate"), series["none"].median("peak_gib")
    larger = f" made larger ({', '.join(f'`{o}`' for o in plan.larger)}: 0.8M parameters)" if plan.larger else ""
    layers = 4 if plan.larger else 2
    lines = [
        f"Workload (g){larger}, `launcher train`, "
        f"1 process, {plan.recompute_steps} steps, medians of {plan.recompute_repeats}; each run a fresh process.",
        "",
        "| `train.activation_checkpointing` | blocks recomputed | peak memory (RSS) | vs none | step time | vs none |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for key in plan.recompute:
        rate, peak = series[key].median("rate"), series[key].median("peak_gib")
        blocks = {"none": "0", "every 2": f"{(layers + 1) // 2} (0, 2, ...)", "full": f"{layers}"}[key]
        lines.append(
            f"| `{RECOMPUTE[key]}` | {blocks} of {layers} | {peak * 1024:,.0f} MiB | {peak - base_peak:+.2f} GiB | "
            f"{1000 / rate:,.0f} ms | {base_rate / rate:.2f}x |"
        )
    return "\n".join(lines)


def baseline_tree(folder: Path, ref: str) -> Path | None:
    """The launcher at `ref`, exported from git into `folder`; None where that fails."""
    out = folder / f"launcher-{ref}"
    out.mkdir()
    archive = subprocess.run(["git", "archive", ref], cwd=REPO, capture_output=True, check=False)
    if archive.returncode != 0:
        return None
    subprocess.run(["tar", "-x", "-C", str(out)], input=archive.stdout, check=True)
    return out


def has_profiler() -> bool:
    import dataclasses

    from launcher.recipe.schema import Recipe  # (no torch)

    return "profile" in {f.name for f in dataclasses.fields(Recipe)}


def profile_overrides(steps: int) -> list[str]:
    return [f"profile.steps={steps}"]


def counter_cost(w: Workload, updates: int) -> dict[str, float]:
    """In this process: the time of an update with torch's FLOP counter on (as the launcher's first update, for a
    model without a formula) and without it; ms."""
    import contextlib

    import torch

    from bench.loops import batches
    from bench.workloads import CLIP, loss_of
    from launcher.flops import FlopMeter

    torch.manual_seed(0)
    data = w.data()
    model = w.model(data)
    model.flops_per_token = None  # the formula would win over counting
    optimizer = w.optimizer(model)
    loader = torch.utils.data.DataLoader(data, batch_size=w.batch_size, shuffle=True)
    it = batches(loader, 3 + 1 + 2 * updates)

    def update(counted: bool) -> float:
        x, y = next(it)
        meter = FlopMeter(model)
        start = time.perf_counter()
        with meter.counting(x) if counted else contextlib.nullcontext():
            loss = loss_of(model(x), y)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - start
        assert not counted or meter.per_update, "nothing counted"
        return seconds * 1000

    for _ in range(3):
        update(False)
    first = update(True)  # the counter's first use in the process
    times: dict[bool, list[float]] = {True: [], False: []}
    for i in range(updates):
        for counted in (i % 2 == 0, i % 2 == 1):  # alternating which goes first
            times[counted].append(update(counted))
    return {"first": first, "counted": statistics.median(times[True]), "plain": statistics.median(times[False])}


def profiler_part(w: Workload, plan: Plan, text: Path, tokens: Path, folder: Path, base_ref: str) -> str:
    variants: dict[str, tuple[list[str], Path]] = {}
    notes = []
    base = baseline_tree(folder, base_ref) if plan.before else None
    if base is None and plan.before:
        notes.append(f"The launcher before the profiler ({base_ref}) is not in this repository's history: left out.")
    elif base is not None:
        variants["before"] = ([], base)
    variants["off"] = ([], REPO)
    if has_profiler():
        variants["on"] = (profile_overrides(plan.profiled), REPO)
    else:
        notes.append("This launcher has no `profile` section yet: the profiler's row is left out.")
    variants["counter"] = (["model._component_=bench.models.CountedGPT"], REPO)
    series = {k: Series() for k in variants}
    for repeat in range(plan.profile_repeats):
        for key, (overrides, root) in variants.items():
            tmp = fresh(folder, "run")
            cmd = launcher_command(w, tmp, plan.profile_steps, overrides)
            r = run(cmd, tmp, root=root)
            series[key].runs.append(r)
            say(f"profiler/counter {key} repeat {repeat + 1}: {r}")
    counting = [sys.executable, "-m", "bench.speed", "counter-cost", w.key, str(plan.counter_updates)]
    counting += ["--text", str(text), "--tokens", str(tokens)]
    cost = json.loads(subprocess.run(counting, cwd=REPO, capture_output=True, text=True, check=True).stdout)
    names = {
        "before": f"launcher before the profiler ({base_ref}), no `profile`",
        "off": "this launcher, no `profile` (off)",
        "on": f"`profile` recording {plan.profiled} steps",
        "counter": "FLOP counter on the first update (a GPT without its formula)",
    }
    reference = series["before" if "before" in series else "off"]
    ref_rate = reference.median("rate")
    lines = [
        f"Workload (b), `launcher train`, 1 process, {plan.profile_steps} steps, medians of {plan.profile_repeats}"
        f" (steps/s from step 10 to the last; the profiled steps among them).",
        "",
        "| run | steps/s | vs the first row (range over repeats) | command to first step |",
        "| --- | --- | --- | --- |",
    ]
    for key, s in series.items():
        rate = s.median("rate")
        lines.append(
            f"| {names[key]} | {rate:,.2f} | {rate / ref_rate:.3f}x ({ratio_range(s.runs, reference.runs)}) | "
            f"{seconds(s.median('first_step'))} |"
        )
    lines += [
        "",
        f"The FLOP counter on one update of workload (b) (one process; medians of {plan.counter_updates} updates "
        "each, alternating, after 3 warm-up updates): what a model without a FLOPs formula pays on its first "
        "update, once per run.",
        "",
        "| update | time | extra |",
        "| --- | --- | --- |",
        f"| without the counter | {cost['plain']:.1f} ms | |",
        f"| with the counter | {cost['counted']:.1f} ms | {cost['counted'] - cost['plain']:+.1f} ms |",
        f"| with the counter, its first use in the process | {cost['first']:.1f} ms | "
        f"{cost['first'] - cost['plain']:+.1f} ms |",
    ]
    return "\n\n".join([*notes, "\n".join(lines)])


def make_tokens(text: Path, folder: Path) -> Path:
    out = folder / "tokens"
    subprocess.run(
        [sys.executable, "-m", "launcher", "tokenize", str(text), "--out", str(out)],
        cwd=REPO, check=True, capture_output=True,
    )  # fmt: skip
    return out


def measure(quick: bool, text: Path = SHAKESPEARE, base_ref: str = PROFILER_BASE) -> str:
    """The speed part's Markdown."""
    if "torch" in sys.modules:
        raise RuntimeError("bench: torch is imported in the harness: every run's peak memory would include its size")
    plan = QUICK if quick else FULL
    if not text.is_file():
        return f"Left out: {text} does not exist (give --text FILE)."
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="launcher-bench-speed-", dir=os.environ.get("BENCH_DIR")) as tmp:
        folder = Path(tmp)
        tokens = make_tokens(text, folder)
        ws = workloads(text, tokens)
        parts = [
            "#### Compilation (`train.compile`)",
            compile_part([ws[k] for k in plan.compile_steps], plan, text, tokens, folder),
            "#### Activation checkpointing (`train.activation_checkpointing`)",
            recompute_part(ws["g"], plan, folder),
            "#### The cost of the profiler and of the FLOP counter",
            profiler_part(ws["b"], plan, text, tokens, folder, base_ref),
        ]
    say(f"speed part: {time.time() - started:.0f} s")
    return "\n\n".join(parts)


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    cost = sub.add_parser("counter-cost", help="the FLOP counter's cost on one update, in this process (JSON)")
    cost.add_argument("workload", choices=["a", "b", "g"])
    cost.add_argument("updates", type=int)
    cost.add_argument("--text", type=Path, default=SHAKESPEARE)
    cost.add_argument("--tokens", type=Path)
    args = parser.parse_args()
    print(json.dumps(counter_cost(workloads(args.text, args.tokens)[args.workload], args.updates)))


if __name__ == "__main__":
    main()
