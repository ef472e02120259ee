"""The hand-written loops the launcher is measured against, one process of one variant per run:

    python -m bench.loops {torch,accelerate,lightning} WORKLOAD STEPS [--text FILE] [--tokens DIR]
    python -m bench.loops torch WORKLOAD STEPS --compile {regional,whole}
    python -m bench.loops {torch,accelerate,lightning} WORKLOAD STEPS --precision bf16

`--precision bf16` trains in bf16 autocast (on the CPU), as people write each: the PyTorch loop's forward and loss
inside `torch.autocast`, backward outside; the Accelerate loop with `Accelerator(mixed_precision="bf16")`, forward
and loss inside `accelerator.autocast()`; Lightning with `precision="bf16-mixed"`.

Each is the loop a user would write for the workload: forward, backward, clip to norm 1.0, step, zero the
gradients, the loss printed every 10 steps. Started by torchrun with 2 processes, each runs DDP over gloo. For the
harness, the main process writes the time of its first optimizer step to $BENCH_FIRST_STEP_FILE, and at every
10th step a line `{"step": N, "time": T}` to $BENCH_STEPS_FILE (as the launcher's metrics.jsonl has them).

`--compile` (the PyTorch loop only) compiles the model in place as `train.compile` does: `regional` calls
`Module.compile` on each of its blocks (the classes in its `_no_split_modules`), `whole` on the model. The loop then
writes `{"compile_s": S}` to $BENCH_COMPILE_FILE: the first step's time beyond the second's, as the launcher's
`compile_s`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, DistributedSampler

from bench.precision import precision_workloads
from bench.workloads import CLIP, LOG_EVERY, SHAKESPEARE, Workload, loss_of, step_loss, workloads


def step_done(step: int) -> None:
    """For the harness: the time of the first step, and of every 10th."""
    if step == 1 and os.environ.get("BENCH_FIRST_STEP_FILE"):
        Path(os.environ["BENCH_FIRST_STEP_FILE"]).write_text(repr(time.time()))
    if step % LOG_EVERY == 0 and os.environ.get("BENCH_STEPS_FILE"):
        with open(os.environ["BENCH_STEPS_FILE"], "a") as f:
            f.write(json.dumps({"step": step, "time": time.time()}) + "\n")


def compile_in_place(model: torch.nn.Module, how: str, backend: str = "inductor") -> None:
    if how == "regional":
        names = tuple(getattr(model, "_no_split_modules", ()))
        blocks = [m for m in model.modules() if type(m).__name__ in names]
        assert blocks, f"{type(model).__name__} declares no blocks"
        for block in blocks:
            block.compile(backend=backend)
    elif how == "whole":
        model.compile(backend=backend)


class FirstSteps:
    """The first two steps' times, for the compile time: the first step's time beyond the second's."""

    def __init__(self) -> None:
        self.times = [time.perf_counter()]

    def tick(self) -> None:
        if len(self.times) < 3:
            self.times.append(time.perf_counter())
            if len(self.times) == 3 and os.environ.get("BENCH_COMPILE_FILE"):
                first, second = (b - a for a, b in zip(self.times, self.times[1:], strict=False))
                Path(os.environ["BENCH_COMPILE_FILE"]).write_text(json.dumps({"compile_s": max(first - second, 0)}))


def batches(loader: DataLoader, steps: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    done, epoch = 0, 0
    while True:
        if isinstance(loader.sampler, DistributedSampler):
            loader.sampler.set_epoch(epoch)
        for batch in loader:
            yield batch
            done += 1
            if done == steps:
                return
        epoch += 1


def autocast(precision: str, device: str = "cpu") -> contextlib.AbstractContextManager:
    """The PyTorch loop's mixed precision, as people write it: forward and loss inside, backward outside."""
    if precision == "bf16":
        return torch.autocast(device, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def torch_loop(
    w: Workload, steps: int, compile: str = "none", backend: str = "inductor", precision: str = "fp32"
) -> None:
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        torch.distributed.init_process_group("gloo")
    torch.manual_seed(0)
    data = w.data()
    model = w.model(data)
    compile_in_place(model, compile, backend)
    optimizer = w.optimizer(model)
    sampler = DistributedSampler(data, shuffle=True, seed=0) if distributed else None
    loader = DataLoader(data, batch_size=w.batch_size, shuffle=sampler is None, sampler=sampler)
    if distributed:
        model = torch.nn.parallel.DistributedDataParallel(model)
    main = not distributed or torch.distributed.get_rank() == 0
    model.train()
    first_steps = FirstSteps()
    for i, batch in enumerate(batches(loader, steps)):
        with autocast(precision):
            if isinstance(batch, dict):
                loss = step_loss(model, batch)
            else:  # as people write it: the logits stay referenced until the next step's replace them
                x, y = batch
                logits = model(x)
                loss = loss_of(logits, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        first_steps.tick()
        if (i + 1) % LOG_EVERY == 0:
            value = loss.detach()
            if distributed:
                torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.AVG)
            if main:
                print(f"step {i + 1} loss {value.item():.4f}", flush=True)
        if main:
            step_done(i + 1)
    if distributed:
        # DDP's reducer freed after its process group is destroyed can abort the process at exit (gloo): free first.
        del model, optimizer
        torch.distributed.destroy_process_group()


def accelerate_loop(w: Workload, steps: int, precision: str = "fp32") -> None:
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True, mixed_precision="bf16" if precision == "bf16" else "no")
    # In fp32 no context at all: the fp32 figures stay those of the loop without mixed precision.
    mixed = accelerator.autocast if precision == "bf16" else contextlib.nullcontext
    torch.manual_seed(0)
    data = w.data()
    model = w.model(data)
    optimizer = w.optimizer(model)
    loader = DataLoader(data, batch_size=w.batch_size, shuffle=True)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    model.train()
    for i, batch in enumerate(batches(loader, steps)):
        with mixed():
            loss = step_loss(model, batch)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (i + 1) % LOG_EVERY == 0:
            accelerator.print(f"step {i + 1} loss {accelerator.reduce(loss.detach(), 'mean').item():.4f}", flush=True)
        if accelerator.is_main_process:
            step_done(i + 1)
    # DDP's reducer freed after its process group is destroyed can abort the process at exit (gloo): free first.
    del model, optimizer, loader
    accelerator.free_memory()
    accelerator.end_training()


def lightning_loop(w: Workload, steps: int, precision: str = "fp32") -> None:
    import lightning as L

    class Module(L.LightningModule):
        def __init__(self, model: torch.nn.Module):
            super().__init__()
            self.model = model

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            loss = step_loss(self.model, batch)
            self.log("train/loss", loss, prog_bar=True, sync_dist=False)
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return w.optimizer(self.model)

        def on_train_batch_end(self, outputs: object, batch: object, batch_idx: int) -> None:
            if self.trainer.is_global_zero:
                step_done(self.global_step)

    world = int(os.environ.get("WORLD_SIZE", "1"))
    torch.manual_seed(0)
    data = w.data()
    module = Module(w.model(data))
    trainer = L.Trainer(
        accelerator="cpu",
        devices=world,
        strategy="ddp" if world > 1 else "auto",
        max_steps=steps,
        precision="bf16-mixed" if precision == "bf16" else "32-true",
        gradient_clip_val=CLIP,
        log_every_n_steps=LOG_EVERY,
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=os.environ.get("BENCH_RUN_DIR", "."),
    )
    trainer.fit(module, DataLoader(data, batch_size=w.batch_size, shuffle=True))


VARIANTS = {"torch": torch_loop, "accelerate": accelerate_loop, "lightning": lightning_loop}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variant", choices=sorted(VARIANTS))
    parser.add_argument("workload", choices=["a", "b", "g", "h", "m", "v"])
    parser.add_argument("steps", type=int)
    parser.add_argument("--text", type=Path, default=SHAKESPEARE)
    parser.add_argument("--tokens", type=Path, help="workload (g): a folder of `launcher tokenize`'s token files")
    parser.add_argument("--compile", choices=["none", "regional", "whole"], default="none", help="the PyTorch loop")
    parser.add_argument("--backend", default="inductor", help="with --compile")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="bf16: autocast on the CPU")
    parser.add_argument("--quick", action="store_true", help="workload (v): the smoke run's shorter blocks")
    args = parser.parse_args()
    ws = workloads(args.text, args.tokens)
    if args.tokens is not None:
        ws.update(precision_workloads(args.tokens, args.quick))
    w = ws[args.workload]
    if w.threads:  # as OMP_NUM_THREADS in the harness's environment says too, which `launcher train` follows
        torch.set_num_threads(w.threads)
    if args.compile != "none":
        if args.variant != "torch":
            parser.error("--compile: the PyTorch loop only")
        torch_loop(w, args.steps, args.compile, args.backend, args.precision)
    else:
        VARIANTS[args.variant](w, args.steps, precision=args.precision)


if __name__ == "__main__":
    main()
