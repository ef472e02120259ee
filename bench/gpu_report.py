"""Tokens/s and model FLOPs utilisation (MFU) of finished GPT runs, from their run dirs alone.

    python bench/gpu_report.py runs/gpu_check/gpt_*

FLOPs per token are PaLM's estimate for a decoder: 6 N (N the non-embedding parameters, plus the tied output
projection) + 12 L d T (attention scores and values, L layers, width d, sequence length T). MFU is the achieved
model FLOP/s over the GPUs' dense peak in the run's precision (`launcher.flops.PEAK_TFLOPS`, the table the
launcher's own `mfu` uses).
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


def main(paths: list[str]) -> None:
    name = device_name()
    peak = peak_flops(name, "bf16")
    print(f"device: {name}; peak {peak / 1e12 if peak else float('nan'):.0f} TFLOP/s per GPU (dense bf16)\n")
    print("| run | strategy | precision | GPUs | tokens/s | MFU | final val/loss |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for path in paths:
        print(report(Path(path), name))


if __name__ == "__main__":
    main(sys.argv[1:])
