"""How long training stalls for a checkpoint: a synchronous save against a background one (checkpoint.async_save).

Runs one process on this machine's CPU with a model big enough for the disk to matter, saves it a few times each
way and prints a Markdown table: the stall (until `save` returns and training can go on) and the time until the
checkpoint is on disk. Ratios are against the synchronous save in the same run.

    python bench/checkpoint_stall.py [--params-millions 25] [--repeats 3] [--dir /tmp/launcher-bench]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time
from pathlib import Path

import torch
from accelerate import Accelerator

from launcher import checkpoint


def build(params_millions: float) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    width = int((params_millions * 1e6 / 4) ** 0.5)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(4)])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, width)).sum().backward()
    optimizer.step()  # Adam's moments exist, as in a real checkpoint
    return model, optimizer


def measure(background: bool, model, optimizer, root: Path, repeats: int) -> tuple[list[float], list[float]]:
    accelerator = Accelerator(cpu=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    writer = checkpoint.Writer(accelerator, background=background)
    stalls, totals = [], []
    for i in range(repeats):
        start = time.perf_counter()
        writer.save(root / checkpoint.step_dir_name(i), model, optimizer, scheduler, {"step": i}, "")
        stalls.append(time.perf_counter() - start)
        writer.wait()
        totals.append(time.perf_counter() - start)
    return stalls, totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params-millions", type=float, default=25.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/launcher-bench"))
    args = parser.parse_args()
    model, optimizer = build(args.params_millions)
    n_params = sum(p.numel() for p in model.parameters())
    results = {}
    for background in (False, True):
        root = args.dir / ("background" if background else "synchronous")
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        results[background] = measure(background, model, optimizer, root, args.repeats)
        size = sum(f.stat().st_size for f in (root / checkpoint.step_dir_name(0)).iterdir())
    base_stall = statistics.median(results[False][0])
    print(f"{n_params / 1e6:.1f}M parameters, {size / 2**20:.0f} MiB per checkpoint, median of {args.repeats} saves\n")
    print("| save | training stalls for | on disk after | stall vs synchronous |")
    print("| --- | --- | --- | --- |")
    for background, (stalls, totals) in results.items():
        stall, total = statistics.median(stalls), statistics.median(totals)
        name = "background (`async_save: true`)" if background else "synchronous"
        print(f"| {name} | {stall:.3f} s | {total:.3f} s | {stall / base_stall:.2f}x |")
    shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
