"""bf16 on the CPU with a big vocabulary (`python -m bench --parts precision`): where the logits and the loss
cost memory, the launcher against the hand-written loop.

Workload (v): the built-in GPT, 2 layers, 64 wide, 4 heads, vocabulary 50304 (GPT-2's, padded), blocks of 512 byte
tokens of Tiny Shakespeare, batch 8, AdamW, clipping 1.0, bf16 autocast on the CPU: the (batch, time, vocab)
logits, 206M numbers, outweigh everything else in the step. Variants:
- `torch`: the PyTorch loop as people write it, forward and loss inside `torch.autocast`, backward outside
  (bench/loops.py);
- `launcher`: `launcher train recipes/gpt_ddp.yaml` made CPU-sized, `train.mixed_precision=bf16`, the plain loss
  (`train.chunked_loss=false` where the launcher knows the key);
- `launcher-chunked`: the same with `train.chunked_loss=true`; left out, with a line saying so, where
  `launcher validate` refuses the key.

Each variant runs as fresh processes, alternating (bench/overhead.py): steps/s from step 10 to the last, and the
peak RSS of the process. Once per variant, a short run inside bench/saved_bytes.py counts the bytes autograd saves
for backward per micro-batch, the bytes of every tensor alive when backward starts, and the most bytes the CPU
allocator held at once (the CPU's `max_memory_allocated`): exact where peak RSS is blunt (the allocator keeps
pages, and the same peak is filled by other buffers). All as ratios to the PyTorch loop.
"""

from __future__ import annotations

import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from bench import overhead
from bench.workloads import CLIP, GPT_CPU, REPO, SHAKESPEARE, Workload, _gpt_adamw

if TYPE_CHECKING:
    import torch
    from torch.utils.data import Dataset

VOCAB = 50304
BLOCK, QUICK_BLOCK = 512, 128  # --quick: a smoke run of the harness, not a figure
BATCH = 8
SHAPE = {"n_layer": 2, "n_head": 4, "n_embd": 64}  # small, so that the head and the logits dominate the step
STEPS, REPEATS = 20, 3  # 4-12 s a step on 2 shared cores: 20 steps give 10 timed ones
SAVED_STEPS = 2  # saved bytes are the same at every step: two forwards, the second past any first-step setup
VARIANTS = ("torch", "launcher", "launcher-chunked")
NAMES = {
    "torch": "PyTorch loop (loss inside autocast)",
    "launcher": "`launcher train`, plain loss",
    "launcher-chunked": "`launcher train`, `train.chunked_loss=true`",
}
CHUNKED_KEY = "train.chunked_loss"


def _data(tokens: Path, block: int) -> Dataset:
    from launcher.data.memmap import TokenMemmap

    return TokenMemmap(str(tokens / "{split}.bin"), split="train", block_size=block, vocab_size=VOCAB)


def _model(data: Dataset) -> torch.nn.Module:
    from launcher.models.gpt import GPT

    return GPT(**data.model_kwargs, **SHAPE, dropout=0.0)  # type: ignore[attr-defined]


def overrides(tokens: Path, block: int) -> tuple[str, ...]:
    """recipes/gpt_ddp.yaml as workload (v): GPT_CPU's CPU-sized run with this shape, vocabulary and bf16."""
    mine = {
        "data.dataset.vocab_size": str(VOCAB),
        "data.dataset.block_size": str(block),
        "train.batch_size": str(BATCH),
        "train.mixed_precision": "bf16",
        **{f"model.{k}": str(v) for k, v in SHAPE.items()},
    }
    kept = [o for o in GPT_CPU if o.split("=", 1)[0] not in mine]
    return (*kept, *(f"{k}={v}" for k, v in mine.items()), f"data.dataset.path={tokens}/{{split}}.bin")


def workload(tokens: Path, quick: bool = False) -> Workload:
    block = QUICK_BLOCK if quick else BLOCK
    return Workload(
        key="v",
        title=f"GPT (2 layers, 64 wide, 4 heads, vocabulary {VOCAB}) on byte tokens of Tiny Shakespeare, "
        f"batch {BATCH} x {block}, AdamW, clipping {CLIP}, "
        "bf16 autocast on the CPU",
        batch_size=BATCH,
        data=functools.partial(_data, tokens, block),
        model=_model,
        optimizer=_gpt_adamw,
        recipe=lambda: (REPO / "recipes" / "gpt_ddp.yaml").read_text(),
        overrides=overrides(tokens, block),
    )


def precision_workloads(tokens: Path, quick: bool = False) -> dict[str, Workload]:
    """The workloads of this part, for bench/loops.py."""
    return {"v": workload(tokens, quick)}


# ------------------------------------------------------------------------------------------------ the commands


def launcher_args(w: Workload, steps: int, folder: Path, chunked: bool | None) -> list[str]:
    """`launcher train`'s arguments; `chunked` None: the launcher's default loss, the key not given."""
    recipe = REPO / "recipes" / "gpt_ddp.yaml"
    args = ["train", str(recipe), f"run_dir={folder / 'run'}", *w.overrides, f"train.max_steps={steps}"]
    return args + ([] if chunked is None else [f"{CHUNKED_KEY}={str(chunked).lower()}"])


def loop_args(steps: int, tokens: Path, text: Path, quick: bool) -> list[str]:
    args = ["torch", "v", str(steps), "--tokens", str(tokens), "--text", str(text), "--precision", "bf16"]
    return args + (["--quick"] if quick else [])


@dataclass(frozen=True)
class Plan:
    tokens: Path
    text: Path
    quick: bool
    chunked_key: bool  # whether this launcher knows train.chunked_loss

    def args(self, variant: str, steps: int, folder: Path) -> tuple[str, list[str]]:
        """(module, arguments) of a variant's run."""
        if variant == "torch":
            return "bench.loops", loop_args(steps, self.tokens, self.text, self.quick)
        w = workload(self.tokens, self.quick)
        chunked = (variant == "launcher-chunked") if self.chunked_key else None
        return "launcher", launcher_args(w, steps, folder, chunked)

    def command(self, variant: str, steps: int, folder: Path) -> list[str]:
        module, args = self.args(variant, steps, folder)
        return [sys.executable, "-m", module, *args]

    def saved_command(self, variant: str, folder: Path) -> list[str]:
        module, args = self.args(variant, SAVED_STEPS, folder)
        return [sys.executable, "-m", "bench.saved_bytes", "--", module, *args]


def knows_chunked_loss(tokens: Path) -> bool:
    """Whether `launcher validate` takes train.chunked_loss (the chunked cross-entropy is in this launcher)."""
    w = workload(tokens, quick=True)
    cmd = [sys.executable, "-m", "launcher", "validate", str(REPO / "recipes" / "gpt_ddp.yaml"), *w.overrides]
    proc = subprocess.run([*cmd, f"{CHUNKED_KEY}=true"], cwd=REPO, capture_output=True, text=True, check=False)
    return proc.returncode == 0


# ------------------------------------------------------------------------------------------------ measuring


@dataclass
class Figures:
    rates: list[float] = field(default_factory=list)  # steps/s
    peak_rss: list[float] = field(default_factory=list)  # MiB
    saved: dict[str, int] = field(default_factory=dict)  # bench/saved_bytes.py's counts


def saved_bytes(plan: Plan, variant: str) -> dict[str, int]:
    """One short run of `variant` inside bench/saved_bytes.py: its counts."""
    with tempfile.TemporaryDirectory(prefix="launcher-bench-") as tmp:
        folder = Path(tmp)
        out = folder / "saved.json"
        env = {**os.environ, "BENCH_SAVED_BYTES_FILE": str(out), "BENCH_RUN_DIR": str(folder / "run")}
        proc = subprocess.run(
            plan.saved_command(variant, folder), cwd=REPO, env=env, capture_output=True, text=True, check=False
        )
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(f"bench.saved_bytes {variant} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
        return json.loads(out.read_text())


def measure(plan: Plan, variants: list[str], steps: int, repeats: int) -> dict[str, Figures]:
    if "torch" in sys.modules:
        raise RuntimeError("bench: torch is imported in the harness: every run's peak memory would include its size")
    figures = {v: Figures() for v in variants}
    for variant in variants:
        say(f"precision: saved bytes of {variant}")
        figures[variant].saved = saved_bytes(plan, variant)
    for repeat in range(repeats):
        for variant in variants:  # alternating: the machine's drifts hit every variant alike
            say(f"precision: {variant}, {steps} steps, repeat {repeat + 1} of {repeats}")
            rate, _, rss = overhead.run_retrying(functools.partial(plan.command, variant, steps))
            figures[variant].rates.append(rate)
            figures[variant].peak_rss.append(rss)
    return figures


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ the table


def ratio(value: float, base: float) -> str:
    return f"{value / base:.2f}x" if base else "n/a"


def table(w: Workload, steps: int, repeats: int, figures: dict[str, Figures]) -> str:
    base = figures["torch"]
    rate0, rss0 = statistics.median(base.rates), statistics.median(base.peak_rss)
    saved0, live0, peak0 = (base.saved[k] for k in ("saved_bytes", "live_bytes", "peak_bytes"))
    lines = [
        f"Workload (v): {w.title}; {steps} steps, medians of {repeats} alternating runs; saved and live bytes from "
        f"one {SAVED_STEPS}-step run of each (the largest micro-batch's); peak allocated: the most tensor bytes the "
        "CPU allocator held at once in that run.",
        "",
        "| variant | steps/s | vs PyTorch | peak RSS | vs PyTorch | peak allocated | vs PyTorch | "
        "saved for backward | vs PyTorch | alive at backward | vs PyTorch |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for variant, f in figures.items():
        rate, rss = statistics.median(f.rates), statistics.median(f.peak_rss)
        saved, live, peak = (f.saved[k] for k in ("saved_bytes", "live_bytes", "peak_bytes"))
        lines.append(
            f"| {NAMES[variant]} | {rate:.3f} | {ratio(rate, rate0)} | {rss:,.0f} MiB | {ratio(rss, rss0)} | "
            f"{peak / 2**20:,.0f} MiB | {ratio(peak, peak0)} | "
            f"{saved / 2**20:,.0f} MiB | {ratio(saved, saved0)} | {live / 2**20:,.0f} MiB | {ratio(live, live0)} |"
        )
    return "\n".join(lines)


def verdict(figures: dict[str, Figures]) -> str:
    """The goal: plain loss at most 1.05x the loop's peak memory, chunked below it; steps/s at least 0.97x."""
    base = figures["torch"]
    rate0, rss0 = statistics.median(base.rates), statistics.median(base.peak_rss)
    said = []
    for variant, limit in (("launcher", 1.05), ("launcher-chunked", 1.0)):
        if variant not in figures:
            continue
        f = figures[variant]
        memory = statistics.median(f.peak_rss) / rss0
        allocated = f.saved["peak_bytes"] / base.saved["peak_bytes"]
        speed = statistics.median(f.rates) / rate0
        ok = (memory <= limit if variant == "launcher" else memory < limit) and speed >= 0.97
        bar = f"peak RSS {'at most' if variant == 'launcher' else 'below'} {limit:.2f}x, steps/s at least 0.97x"
        said.append(f"{NAMES[variant]}: peak RSS {memory:.2f}x (peak allocated {allocated:.2f}x), steps/s "
                    f"{speed:.2f}x: {'met' if ok else 'NOT met'} ({bar}).")  # fmt: skip
    return "\n".join(f"- {line}" for line in said)


def make_tokens(text: Path, folder: Path) -> Path:
    out = folder / "tokens"
    cmd = [sys.executable, "-m", "launcher", "tokenize", str(text), "--out", str(out)]
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
    return out


def run(quick: bool, text: Path = SHAKESPEARE, repeats: int | None = None, variants: list[str] | None = None) -> str:
    """The part's Markdown."""
    if not text.is_file():
        return f"Workload (v) left out: {text} does not exist (give --text FILE)."
    steps, repeats = (20, 1) if quick else (STEPS, repeats or REPEATS)
    wanted = list(variants or VARIANTS)
    with tempfile.TemporaryDirectory(prefix="launcher-bench-precision-", dir=os.environ.get("BENCH_DIR")) as tmp:
        tokens = make_tokens(text, Path(tmp))
        plan = Plan(tokens, text, quick, knows_chunked_loss(tokens))
        notes = []
        if not plan.chunked_key and "launcher-chunked" in wanted:
            wanted.remove("launcher-chunked")
            notes.append(f"`launcher validate` refuses `{CHUNKED_KEY}`: this launcher has no chunked loss, its row "
                         "is left out; the plain row is the launcher's only loss, run without the key.")  # fmt: skip
        figures = measure(plan, ["torch", *(v for v in wanted if v != "torch")], steps, repeats)
        w = workload(tokens, quick)
    parts = [table(w, steps, repeats, figures), verdict(figures), *notes]
    return "\n\n".join(p for p in parts if p)
