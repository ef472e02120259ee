"""Tokens/s and model FLOPs utilisation (MFU) of finished GPT runs, from their run dirs alone.

    python bench/gpu_report.py runs/gpu_check/gpt_*
    python bench/gpu_report.py --speed runs/gpu_check/speed_*    the speed features' runs: one row each


FLOPs per token are PaLM's estimate for a decoder: 6 N (N the non-embedding parameters, plus the tied output
projection) + 12 L d T (attention scores and values, L layers, width d, sequence length T). MFU is the achieved
model FLOP/s over the GPUs' dense peak in the run's precision (`launcher.flops.PEAK_TFLOPS`, the table the
launcher's own `mfu` uses).

`--speed` reads what the launcher logged itself (`throughput/tokens_per_s`, `mfu` per device, `compile_s`,
`memory/peak_gib`), past the first quarter of the rows (compilation and warm-up), and says for each run whether it
was compiled and which blocks recompute their activations.
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


def main(paths: list[str]) -> None:
    if paths[:1] == ["--speed"]:
        speed(paths[1:])
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
