"""The launcher's cost per step against loops written by hand, on the same model, data, batch and optimizer.

    python bench/overhead.py [--steps 1500] [--repeats 3]

Variants, each a fresh process, run alternately:
  torch       a minimal PyTorch loop (forward, backward, clip, step, a loss printed every 10 steps)
  accelerate  the same loop written with Accelerate (prepare, accelerator.backward, clip_grad_norm_)
  launcher    `launcher train` on the equivalent recipe, with logging every 10 steps and the progress bar on

Each variant runs twice per repeat, for 1 step and for --steps steps: the difference of the wall times is the
time of --steps - 1 steps without start-up, so steps/s compare the loops alone and the 1-step run gives the time
from the command to the first optimizer step. Medians over the repeats.
Workload (a): the built-in MLP (32 -> 64 -> 4) on the synthetic set, batch 32, Adam, clipping at 1.0, one process.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

BATCH, FEATURES, HIDDEN, CLASSES, SAMPLES = 32, 32, 64, 4, 8192
RECIPE = f"""\
model: {{_component_: mlp, hidden_sizes: [{HIDDEN}]}}
data:
  dataset: {{_component_: synthetic_classification, num_features: {FEATURES}, num_classes: {CLASSES}}}
  train: {{split: train, num_samples: {SAMPLES}}}
  val: null
optimizer: {{_component_: adam, lr: 0.001}}
train: {{batch_size: {BATCH}, clip_grad_norm: 1.0, seed: 0}}
checkpoint: {{save_final: false}}
logging: {{every_steps: 10, progress_bar: true}}
"""


def data_and_model() -> tuple[torch.utils.data.DataLoader, torch.nn.Module]:
    from launcher.data.synthetic import SyntheticClassification
    from launcher.models.mlp import MLP

    torch.manual_seed(0)
    data = SyntheticClassification(split="train", num_samples=SAMPLES, num_features=FEATURES, num_classes=CLASSES)
    loader = torch.utils.data.DataLoader(data, batch_size=BATCH, shuffle=True)
    return loader, MLP(FEATURES, CLASSES, hidden_sizes=[HIDDEN])


def batches(loader: torch.utils.data.DataLoader, steps: int):
    done = 0
    while True:
        for batch in loader:
            yield batch
            done += 1
            if done == steps:
                return


def torch_loop(steps: int) -> None:
    loader, model = data_and_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for i, (x, y) in enumerate(batches(loader, steps)):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i % 10 == 0:
            print(f"step {i} loss {loss.item():.4f}")


def accelerate_loop(steps: int) -> None:
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    loader, model = data_and_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    for i, (x, y) in enumerate(batches(loader, steps)):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i % 10 == 0:
            accelerator.print(f"step {i} loss {loss.item():.4f}")


def command(variant: str, steps: int, folder: Path) -> list[str]:
    if variant == "launcher":
        recipe = folder / "bench.yaml"
        recipe.write_text(RECIPE)
        run_dir = folder / f"run-{time.monotonic_ns()}"
        return [
            sys.executable,
            "-m",
            "launcher",
            "train",
            str(recipe),
            f"run_dir={run_dir}",
            f"train.max_steps={steps}",
        ]
    return [sys.executable, __file__, "--run", variant, "--steps", str(steps)]


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--run", choices=["torch", "accelerate"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        {"torch": torch_loop, "accelerate": accelerate_loop}[args.run](args.steps)
        return

    variants = ["torch", "accelerate", "launcher"]
    rates: dict[str, list[float]] = {v: [] for v in variants}
    first: dict[str, list[float]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            for variant in variants:  # alternating, so drifts of the machine hit every variant alike
                one = timed(command(variant, 1, Path(tmp)))
                full = timed(command(variant, args.steps, Path(tmp)))
                first[variant].append(one)
                rates[variant].append((args.steps - 1) / max(full - one, 1e-9))
    base = statistics.median(rates["torch"])
    print(
        f"workload (a): MLP {FEATURES}-{HIDDEN}-{CLASSES}, batch {BATCH}, Adam, {args.steps} steps, 1 process; "
        f"medians of {args.repeats}; torch {torch.__version__}"
    )
    print("| variant | steps/s | samples/s | vs PyTorch | overhead per step | command to first step |")
    print("| --- | --- | --- | --- | --- | --- |")
    for variant in variants:
        rate = statistics.median(rates[variant])
        overhead_ms = (1 / rate - 1 / base) * 1000
        print(
            f"| {variant} | {rate:,.0f} | {rate * BATCH:,.0f} | {rate / base:.2f}x | {overhead_ms:+.3f} ms | "
            f"{statistics.median(first[variant]):.2f} s |"
        )


if __name__ == "__main__":
    main()
