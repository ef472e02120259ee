"""No host sync in a steady-state training step: a tiny model through the launcher's real update path (the loop's
`Training`, `Updates.micro_step`, `Updates.update` and `after_update`) under `torch.cuda.set_sync_debug_mode`.

    python -m bench.sync_check                   on CUDA: exit 1 if a checked step synchronises (no CUDA: exit 0)
    python -m bench.sync_check --cpu             the same logic on the CPU: a host read of a tensor (`.item()`,
                                                 `.tolist()`, `bool`, `float` or `int` of one) raises instead
    python -m bench.sync_check --cpu optimizer.fused=false    the host path: must fail (the check sees host reads)

Checked: steps that are neither log, evaluation nor save steps nor one of the reads of the skips (about once a
second; deferred past the checked steps), with the recipe's optimizer (AdamW without `fused`, which CUDA makes
fused by default; on the CPU `optimizer.fused=true` is given), one of them with a NaN in its batch, which the
optimizer must skip on the device. First with batches already on the device, then drawn from the run's own loader
(the copy to the device included). Afterwards the skips are read: one skipped update counted, the parameters and
the optimizer's step count as they were before it.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import tempfile
import traceback
from collections.abc import Iterator
from pathlib import Path

RECIPE = """\
model: {_component_: mlp, hidden_sizes: [64, 64]}
data:
  dataset: {_component_: synthetic_classification, num_features: 16, num_classes: 4}
  train: {split: train, num_samples: 4096}
  val: {split: val, num_samples: 256}
optimizer: {_component_: adamw, lr: 0.001}
train: {max_steps: 1000000, batch_size: 64, seed: 0, clip_grad_norm: 1.0}
eval: {every_steps: null, every_epoch: false}
checkpoint: {every_steps: null, save_final: false}
logging: {every_steps: 1000000, trackers: [jsonl], progress_bar: false}
"""
WARMUP = 6  # updates before the check: lazy state, the first reads of the skips
CHECKED = 8  # updates checked per phase
NAN_AT = 3  # the update (within the first phase) whose batch holds a NaN


class HostRead(RuntimeError):
    pass


@contextlib.contextmanager
def no_host_sync(cpu: bool) -> Iterator[None]:
    """On CUDA, any synchronising call raises (torch's sync debug mode); on the CPU, where nothing synchronises,
    reading a tensor's value on the host raises instead: the calls that would synchronise on a GPU."""
    import torch

    if not cpu:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode("default")
        return
    names = ("item", "tolist", "__bool__", "__float__", "__int__")
    saved = {name: getattr(torch.Tensor, name) for name in names}

    def refuse(name: str):
        def read(self, *args, **kwargs):
            raise HostRead(f"a host read of a tensor: Tensor.{name}")

        return read

    for name in names:
        setattr(torch.Tensor, name, refuse(name))
    try:
        yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


def forever(loader) -> Iterator:
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="run the logic on the CPU (host reads refused)")
    parser.add_argument("overrides", nargs="*", help="recipe overrides (key.path=value)")
    args = parser.parse_args(argv)
    if args.cpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the CPU even on a GPU machine (before torch looks)
    import torch

    if not args.cpu and not torch.cuda.is_available():
        print("sync_check: no CUDA here: skipped (python -m bench.sync_check --cpu runs its logic on the CPU)")
        return 0
    overrides = (["optimizer.fused=true"] if args.cpu else []) + list(args.overrides)
    with tempfile.TemporaryDirectory() as tmp:
        recipe_file = Path(tmp) / "sync_check.yaml"
        recipe_file.write_text(RECIPE)
        return check(recipe_file, [f"run_dir={Path(tmp) / 'run'}", *overrides], args.cpu)


def check(recipe_file: Path, overrides: list[str], cpu: bool) -> int:
    from launcher import loop, strategies
    from launcher.consensus import StopRequests
    from launcher.recipe import load_recipe

    recipe = load_recipe(recipe_file, overrides)
    start = loop.preflight(recipe, os.environ)
    strategy = strategies.choose(recipe, 1)
    with strategy.process_setup():
        accelerator = strategy.accelerator(None)
        try:
            training = loop.Training(accelerator, recipe, strategy, start, StopRequests())
            try:
                return run_checks(training, cpu)
            finally:
                training.progress.close()
                training.files.close()
        finally:
            loop.tear_down(accelerator, start.lock)


def run_checks(training, cpu: bool) -> int:
    import torch

    updates, stepper = training.updates, training.parts.stepper
    batches = forever(training.parts.train_loader)

    def update(inputs, targets) -> None:
        while not updates.micro_step(inputs, targets):
            inputs, targets = next(batches)
        training.after_update(updates.update())

    for _ in range(WARMUP):
        update(*next(batches))
    if not stepper.skips_on_device():  # checked all the same: the host path's reads show where they are
        print(f"sync_check: {type(stepper.inner).__name__} does not skip on the device (not fused?)")
    updates.read_skips()
    skipped_before = training.state.skipped_steps
    updates.agreement.reads.agreed(training.state.step, 10**9)  # the next read of the skips: after the check
    where = "cuda (sync debug mode: error)" if not cpu else "cpu (host reads refused)"
    failure, snapshots = checked_updates(training, update, batches, cpu)
    if failure:
        print(f"sync_check: FAILED on {where}, {failure}")
        return 1
    updates.read_skips()
    problems = []
    if training.state.skipped_steps - skipped_before != 1:
        problems.append(f"{training.state.skipped_steps - skipped_before} skipped updates counted, not 1")
    if not all(torch.equal(a, b) for a, b in zip(*snapshots, strict=True)):
        problems.append("the skipped update changed the parameters or the optimizer's step count")
    if problems:
        print(f"sync_check: FAILED on {where}: " + "; ".join(problems))
        return 1
    print(
        f"sync_check: ok on {where}: {2 * CHECKED} steady-state updates through the launcher's update path "
        f"({type(stepper.inner).__name__}, fused), one skipped on the device, without a host sync"
    )
    return 0


def checked_updates(training, update, batches: Iterator, cpu: bool) -> tuple[str, list[list]]:
    """The checked updates: what synchronised and where (empty if nothing did), and the parameters and step
    counts just before and just after the update with a NaN."""
    stepper = training.parts.stepper
    device = training.accelerator.device
    ready = [tuple(t.to(device) for t in next(batches)) for _ in range(CHECKED)]
    ready[NAN_AT] = (ready[NAN_AT][0] * math.nan, ready[NAN_AT][1])
    snapshots: list[list] = []
    phase = "batches on the device"
    try:
        with no_host_sync(cpu):
            for i, (inputs, targets) in enumerate(ready):
                if i == NAN_AT:
                    snapshots.append([p.detach().clone() for p in stepper.parameters] + optimizer_steps(stepper))
                update(inputs, targets)
                if i == NAN_AT:
                    snapshots.append([p.detach().clone() for p in stepper.parameters] + optimizer_steps(stepper))
            phase = "batches from the run's loader"
            for _ in range(CHECKED):
                update(*next(batches))
    except (HostRead, RuntimeError) as e:
        frames = [f for f in traceback.extract_tb(e.__traceback__) if "/launcher/" in f.filename][-3:]
        at = "; ".join(f"{Path(f.filename).name}:{f.lineno} {f.line}" for f in frames)
        return f"{phase}: {str(e).splitlines()[0]}\n  in the launcher at: {at}", snapshots
    return "", snapshots


def optimizer_steps(stepper) -> list:
    """Every parameter's step count in the optimizer (copies, on the device)."""
    state = stepper.inner.state
    return [state[p]["step"].clone() for p in stepper.parameters if p in state and "step" in state[p]]


if __name__ == "__main__":
    sys.exit(main())
