"""Tokens/s and model FLOPs utilisation (MFU) of finished GPT runs, from their run dirs alone.

    python bench/gpu_report.py runs/gpu_check/gpt_*
    python bench/gpu_report.py --speed runs/gpu_check/speed_*    the speed features' runs: one row each
    python bench/gpu_report.py --side-by-side runs/gpu_check/side_*    bench/gpu_loop.py against the launcher


FLOPs per token are PaLM's estimate for a decoder: 6 N (N the non-embedding parameters, plus the tied output
projection) + 12 L d T (attention scores and values, L layers, width d, sequence length T). MFU is the achieved
model FLOP/s over the GPUs' dense peak in the run's precision (`launcher.flops.PEAK_TFLOPS`, the table the
launcher's own `mfu` uses).

`--speed` reads what the launcher logged itself (`throughput/tokens_per_s`, `mfu` per device, `compile_s`,
`memory/peak_gib`), past the first quarter of the rows (compilation and warm-up), and says for each run whether it
was compiled and which blocks recompute their activations.

`--side-by-side` puts the bench's nanoGPT-style loop (a folder with bench/gpu_loop.py's `loop.json`) and launcher
runs of the same shape in one table: tokens/s from step SIDE_WARMUP to the last (the launcher's from its
metrics.jsonl rows' times, as the loop times itself), MFU by the formula above, peak memory (the loop's
`torch.cuda.max_memory_allocated`, the launcher's `memory/peak_gib`), each as a ratio to the loop compiled alike
(eager against eager, regional against regional, whole model against whole model).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import yaml

from launcher.flops import matmul_precision, peak_flops


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"


def flops_per_token(model: dict, vocab_size: int, block_size: int) -> float:
    layers, width = int(model.get("n_layer", 4)), int(model.get("n_embd", 128))
    per_layer = 12 * width * width  # attention (4 d^2) and MLP (8 d^2) weights
    params = layers * per_layer + vocab_size * width  # the tied output projection computes too
    return 6 * params + 12 * layers * width * block_size


def report(run_dir: Path, device: str) -> str:
    recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    peak = peak_flops(device, matmul_precision(recipe["train"]["mixed_precision"]))
    env = json.loads((run_dir / "env.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [r["throughput/tokens_per_s"] for r in rows if "throughput/tokens_per_s" in r]
    rates = rates[len(rates) // 4 :] or rates  # past the warm-up (compilation, allocator, first batches)
    tokens_per_s = statistics.median(rates) if rates else float("nan")
    data = recipe["data"]["train"]
    per_token = flops_per_token(recipe["model"], int(data.get("vocab_size") or 50304), int(data["block_size"]))
    gpus = int(env.get("num_processes", env.get("world_size", 1)))
    mfu = f"{tokens_per_s * per_token / (peak * gpus):.1%}" if peak else "n/a"
    final = [r["val/loss"] for r in rows if "val/loss" in r]
    return (
        f"| {run_dir.name} | {recipe['strategy']['name']} | {recipe['train']['mixed_precision']} | {gpus} | "
        f"{tokens_per_s:,.0f} | {mfu} | {final[-1] if final else float('nan'):.3f} |"
    )


def median_past_warmup(rows: list[dict], key: str) -> float:
    values = [r[key] for r in rows if key in r]
    values = values[len(values) // 4 :] or values
    return statistics.median(values) if values else float("nan")


def speed_row(run_dir: Path) -> str:
    """One run of the speed features: its recipe's compile and activation checkpointing, and its own figures."""
    recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = recipe["train"]
    compiled = train.get("compile", False)
    if isinstance(compiled, dict):
        compiled = "whole model" if compiled.get("regional") is False else "regional"
    compiled = {True: "regional", False: "eager"}.get(compiled, compiled)
    recompute = train.get("activation_checkpointing", "none")
    if isinstance(recompute, dict):
        recompute = f"every {recompute['every']}"
    compile_s = next((r["compile_s"] for r in rows if "compile_s" in r), None)
    mfu = median_past_warmup(rows, "mfu")
    peak = max((r["memory/peak_gib"] for r in rows if "memory/peak_gib" in r), default=float("nan"))
    return (
        f"| {run_dir.name} | {train['mixed_precision']} | {compiled} | {recompute} | "
        f"{median_past_warmup(rows, 'throughput/tokens_per_s'):,.0f} | "
        f"{'n/a' if mfu != mfu else f'{mfu:.1%}'} | {median_past_warmup(rows, 'flops_per_s') / 1e12:,.2f} | "
        f"{'-' if compile_s is None else f'{compile_s:.1f} s'} | {peak:.2f} GiB |"
    )


def speed(paths: list[str]) -> None:
    print("| run | precision | compile | activation checkpointing | tokens/s (all GPUs) | MFU (per GPU) | "
          "TFLOP/s (per GPU) | compile time | peak memory (per GPU) |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for path in paths:
        print(speed_row(Path(path)))


SIDE_WARMUP = 20  # steps before the timing starts: compilation and the allocator's warm-up


def compile_mode(compiled: object) -> str:
    """`train.compile` as bench/gpu_loop.py's --compile names it."""
    if isinstance(compiled, dict):
        if compiled.get("enabled") is False:
            return "none"
        return "whole" if compiled.get("regional") is False else "regional"
    return "regional" if compiled else "none"


def launcher_side(run_dir: Path, device: str) -> dict:
    """A launcher run's side-by-side figures."""
    recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train, data = recipe["train"], recipe["data"]["train"]
    block, vocab = int(data["block_size"]), int(data.get("vocab_size") or 50304)
    timed = {r["step"]: r["time"] for r in rows if "time" in r and r.get("step", 0) >= SIDE_WARMUP}
    tokens_per_step = train["batch_size"] * train.get("gradient_accumulation_steps", 1) * block
    first, last = (min(timed), max(timed)) if len(timed) >= 2 else (0, 0)
    rate = (last - first) * tokens_per_step / (timed[last] - timed[first]) if last > first else float("nan")
    peak = peak_flops(device, "bf16")
    per_token = flops_per_token(recipe["model"], vocab, block)
    loss = {True: "chunked loss", False: "plain loss"}.get(train.get("chunked_loss"), "the default loss")
    return {
        "name": f"`launcher train`, {loss}",
        "compile": compile_mode(train.get("compile", False)),
        "tokens_per_s": rate,
        "mfu": rate * per_token / peak if peak else None,
        "peak_gib": max((r["memory/peak_gib"] for r in rows if "memory/peak_gib" in r), default=None),
    }


def loop_side(path: Path) -> dict:
    result = json.loads(path.read_text())
    return {**result, "name": "hand-written loop (bench/gpu_loop.py)"}


def ratio(value: float | None, base: float | None) -> str:
    return f"{value / base:.2f}x" if value is not None and base else "n/a"


def side_by_side(paths: list[str]) -> None:
    name = device_name()
    runs = [loop_side(Path(p) / "loop.json") if (Path(p) / "loop.json").exists() else launcher_side(Path(p), name)
            for p in paths]  # fmt: skip
    loops = {r["compile"]: r for r in runs if "variant" in r}
    print(f"device: {name}; tokens/s from step {SIDE_WARMUP} on; ratios to the hand-written loop compiled alike\n")
    print("| variant | compile | tokens/s | vs loop | MFU | peak memory | vs loop |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in sorted(runs, key=lambda r: (("none", "regional", "whole").index(r["compile"]), "variant" not in r)):
        base = loops.get(r["compile"], {})
        mfu = "n/a" if r["mfu"] is None else f"{r['mfu']:.1%}"
        peak = "n/a" if r["peak_gib"] is None else f"{r['peak_gib']:.2f} GiB"
        print(
            f"| {r['name']} | {r['compile']} | {r['tokens_per_s']:,.0f} | "
            f"{ratio(r['tokens_per_s'], base.get('tokens_per_s'))} | {mfu} | {peak} | "
            f"{ratio(r['peak_gib'], base.get('peak_gib'))} |"
        )


def main(paths: list[str]) -> None:
    if paths[:1] == ["--speed"]:
        speed(paths[1:])
        return
    if paths[:1] == ["--side-by-side"]:
        side_by_side(paths[1:])
        return
    name = device_name()
    peak = peak_flops(name, "bf16")
    print(f"device: {name}; peak {peak / 1e12 if peak else float('nan'):.0f} TFLOP/s per GPU (dense bf16)\n")
    print("| run | strategy | precision | GPUs | tokens/s | MFU | final val/loss |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for path in paths:
        print(report(Path(path), name))


if __name__ == "__main__":
    main(sys.argv[1:])
