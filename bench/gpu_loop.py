"""The bench's own nanoGPT-style training loop, the launcher's yardstick on a GPU (bench/gpu_check.sh):

    python -m bench.gpu_loop --tokens DIR --out RESULT.json [--compile {none,regional,whole}] [--steps N]
    python -m bench.gpu_loop --tokens DIR --out RESULT.json --tiny --device cpu      a smoke run of the loop

The GPT-2 124M shape (12 layers, 12 heads, 768 wide, no bias, dropout 0, tied head, vocabulary 50304; the launcher's
own GPT class, so that both sides train the same model), batch 16 x 1024, no accumulation, bf16 autocast with the
loss inside it, fused AdamW (the launcher's param groups, lr 6e-4, betas 0.9/0.95, decay 0.1), clipping to norm 1.0.
Batches as nanoGPT reads them: random blocks of the token memmap, pinned and copied without waiting, the next one
fetched while the GPU works on the current one; the loss read every 10 steps, as the launcher logs it.

Tokens/s are timed from step --warmup to the last (compilation and the allocator's warm-up stay out), MFU with
bench/gpu_report.py's FLOP formula against the GPU's dense bf16 peak, peak memory `torch.cuda.max_memory_allocated`
(on the CPU: the process's peak RSS, MFU n/a). The result goes to --out as JSON for `gpu_report.py --side-by-side`.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

LOG_EVERY = 10
GPT2 = {"n_layer": 12, "n_head": 12, "n_embd": 768, "vocab_size": 50304, "block_size": 1024, "batch_size": 16}
TINY = {"n_layer": 2, "n_head": 2, "n_embd": 64, "vocab_size": 50304, "block_size": 64, "batch_size": 4}


def batch_reader(tokens: Path, batch: int, block: int, device: torch.device) -> Callable[[], tuple]:
    """nanoGPT's get_batch: random blocks of train.bin, pinned, copied to the GPU without the host waiting."""
    data = np.memmap(tokens / "train.bin", dtype=np.uint16, mode="r")
    cuda = device.type == "cuda"

    def get() -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(len(data) - block - 1, (batch,)).tolist()
        x = torch.stack([torch.from_numpy(data[i : i + block].astype(np.int64)) for i in starts])
        y = torch.stack([torch.from_numpy(data[i + 1 : i + 1 + block].astype(np.int64)) for i in starts])
        if cuda:
            return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        return x, y

    return get


def build(shape: dict[str, int], device: torch.device, compile: str) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    from bench.loops import compile_in_place
    from launcher import param_groups
    from launcher.models.gpt import GPT

    model = GPT(
        shape["vocab_size"], shape["block_size"], shape["n_layer"], shape["n_head"], shape["n_embd"], 0.0, False
    ).to(device)
    # The launcher's groups (`optimizer.decay: matrices`): both sides decay the same weights.
    groups = param_groups.to_torch(param_groups.make_groups(model, "matrices", [], 0.1))
    fused = {"fused": True} if device.type == "cuda" else {}
    optimizer = torch.optim.AdamW(groups, lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1, **fused)
    compile_in_place(model, compile)
    return model, optimizer


def train(shape: dict[str, int], tokens: Path, device: torch.device, compile: str, steps: int, warmup: int) -> dict:
    """The loop; its figures."""
    torch.manual_seed(1337)
    model, optimizer = build(shape, device, compile)
    get_batch = batch_reader(tokens, shape["batch_size"], shape["block_size"], device)
    vocab = shape["vocab_size"]
    x, y = get_batch()
    model.train()
    started = None
    for step in range(1, steps + 1):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits = model(x)
            loss = F.cross_entropy(logits.view(-1, vocab), y.view(-1))
        x, y = get_batch()  # the next batch is read while the GPU computes this one's backward
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % LOG_EVERY == 0:
            print(f"step {step} loss {loss.item():.4f}", flush=True)  # a host sync, as the launcher's log line
        if step == warmup:
            synchronize(device)
            started = time.perf_counter()
    synchronize(device)
    elapsed = time.perf_counter() - started if started else float("nan")
    tokens_per_s = (steps - warmup) * shape["batch_size"] * shape["block_size"] / elapsed
    return {"tokens_per_s": tokens_per_s, "peak_gib": peak_gib(device), **mfu(shape, tokens_per_s, device)}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def mfu(shape: dict[str, int], tokens_per_s: float, device: torch.device) -> dict:
    """MFU as bench/gpu_report.py computes it for the launcher's runs (None without a known peak)."""
    from bench.gpu_report import flops_per_token
    from launcher.flops import peak_flops

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = peak_flops(name, "bf16") if device.type == "cuda" else None
    per_token = flops_per_token(shape, shape["vocab_size"], shape["block_size"])
    return {"device": name, "flops_per_token": per_token, "mfu": tokens_per_s * per_token / peak if peak else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=Path, required=True, help="a folder with train.bin (uint16 token ids)")
    parser.add_argument("--out", type=Path, required=True, help="the result, JSON")
    parser.add_argument("--compile", choices=["none", "regional", "whole"], default="none")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=20, help="steps before the timing starts")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help=f"a smoke run's shape: {TINY}")
    args = parser.parse_args()
    if args.steps <= args.warmup:
        parser.error("--steps must be more than --warmup")
    shape = TINY if args.tiny else GPT2
    result = train(shape, args.tokens, torch.device(args.device), args.compile, args.steps, args.warmup)
    result.update(variant="loop", compile=args.compile, shape=shape, steps=args.steps, warmup=args.warmup)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
