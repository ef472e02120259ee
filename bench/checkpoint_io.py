"""Checkpoint save and load against one plain write of the same bytes, and the stall of background saving.

One process on this machine's CPU, a model of N million parameters trained one AdamW step (weights plus both
moments: about 12 bytes a parameter on disk). Each way is timed `repeats` times; medians are shown.

- save: the launcher's synchronous save (safetensors weights, optimizer, scheduler, RNG, recipe, every file's size
  and checksum in the state, every file synced, then the directory renamed into place) against `torch.save` of
  the model's and optimizer's state dicts in one file, and safetensors' `save_file` of every tensor in one file,
  each followed by fsync so that all three are on disk when timed (the plain writes without fsync are shown too:
  the page cache absorbs them);
- load: the launcher's resume (every file's size and checksum checked, then `checkpoint.load` into the model and
  optimizer) against `torch.load` or safetensors' `load_file` of the plain files plus `load_state_dict` (the
  optimizer's tensors copied out of the lazily mapped file, so that every byte is read), with the page cache
  dropped before each load where this machine lets us (root on Linux), so every read comes from the disk;
- background saving (`checkpoint.async_save`): how long training stalls, and when the checkpoint is on disk.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file

from launcher import checkpoint
from launcher.checkpoint import integrity


def build(params_millions: float) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    width = int((params_millions * 1e6 / 4) ** 0.5)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(4)])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, width)).sum().backward()
    optimizer.step()  # Adam's moments exist, as in a real checkpoint
    return model, optimizer


def drop_page_cache() -> bool:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def fsync(path: Path) -> None:
    with path.open("rb") as f:
        os.fsync(f.fileno())


def flat(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Every tensor of the model and optimizer under one name, as one safetensors file holds them."""
    out = {f"model.{k}": v for k, v in model.state_dict().items()}
    for i, s in optimizer.state_dict()["state"].items():
        out.update({f"optimizer.{i}.{k}": v for k, v in s.items()})
    return out


def timed(fn: Callable[[], object], repeats: int, before: Callable[[], object] = lambda: None) -> float:
    times = []
    for _ in range(repeats):
        before()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def size_of(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


@dataclass
class Setup:
    """The model and optimizer measured, and where the files go."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    accelerator: Accelerator
    root: Path

    @property
    def ckpt(self) -> Path:
        return self.root / checkpoint.step_dir_name(1)

    @property
    def pt(self) -> Path:
        return self.root / "plain.pt"

    @property
    def st(self) -> Path:
        return self.root / "plain.safetensors"


def run(params_millions: float, repeats: int, root: Path) -> str:
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    model, optimizer = build(params_millions)
    n_params = sum(p.numel() for p in model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    setup = Setup(model, optimizer, scheduler, Accelerator(cpu=True), root)
    cold = drop_page_cache()
    rows = measure_saves(setup, repeats)
    sizes = {"launcher": size_of(setup.ckpt), "torch": size_of(setup.pt), "safetensors": size_of(setup.st)}
    rows += measure_loads(setup, repeats)
    stall_rows = measure_stalls(setup, repeats)
    shutil.rmtree(root, ignore_errors=True)
    return table(n_params, repeats, cold, rows, sizes, stall_rows)


def measure_saves(setup: Setup, repeats: int) -> list[tuple[str, str, float]]:
    model, optimizer, ckpt, pt, st = setup.model, setup.optimizer, setup.ckpt, setup.pt, setup.st
    sync_writer = checkpoint.Writer(setup.accelerator, model, optimizer, setup.scheduler)

    def torch_save(sync: bool = True) -> None:
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, pt)
        if sync:
            fsync(pt)

    def safetensors_save(sync: bool = True) -> None:
        save_file(flat(model, optimizer), str(st))
        if sync:
            fsync(st)

    saves = {
        "launcher checkpoint (weights and optimizer in safetensors, checksums, all synced)": lambda: sync_writer.save(
            ckpt, {"step": 1}, ""
        ),
        "one `torch.save` + fsync": torch_save,
        "one safetensors `save_file` + fsync": safetensors_save,
        "one `torch.save`, no fsync (page cache)": lambda: torch_save(sync=False),
        "one safetensors `save_file`, no fsync (page cache)": lambda: safetensors_save(sync=False),
    }
    save_times: dict[str, list[float]] = {name: [] for name in saves}
    for fn in saves.values():  # a first, untimed round: imports, allocations, files on disk to load later
        fn()
    for _ in range(repeats):
        for name, fn in saves.items():  # alternating; each writes a new file, the last one removed untimed
            target = ckpt if "launcher" in name else pt if "torch" in name else st
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
            save_times[name].append(timed(fn, 1, before=os.sync))
    return [("save", n, statistics.median(t)) for n, t in save_times.items()]


def measure_loads(setup: Setup, repeats: int) -> list[tuple[str, str, float]]:
    model, optimizer, ckpt = setup.model, setup.optimizer, setup.ckpt

    def launcher_load() -> None:
        assert integrity.problems(ckpt) is None  # a resume checks every file's size and checksum first
        checkpoint.load(setup.accelerator, ckpt, model, optimizer, setup.scheduler)

    def torch_load() -> None:
        state = torch.load(setup.pt, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])

    def safetensors_load() -> None:
        tensors = load_file(str(setup.st))
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        opt_state = optimizer.state_dict()
        for key, value in tensors.items():
            if key.startswith("optimizer."):
                _, i, name = key.split(".", 2)
                opt_state["state"][int(i)][name] = value.clone()  # read now: load_file maps the file lazily
        optimizer.load_state_dict(opt_state)

    return [
        ("load", name, timed(fn, repeats, before=drop_page_cache))
        for name, fn in [
            ("launcher resume (checksums checked, then `checkpoint.load`)", launcher_load),
            ("one `torch.load` + `load_state_dict`", torch_load),
            ("one safetensors `load_file` + `load_state_dict`", safetensors_load),
        ]
    ]


def measure_stalls(setup: Setup, repeats: int) -> list[tuple[bool, float, float]]:
    stall_rows = []
    for background in (False, True):
        writer = checkpoint.Writer(
            setup.accelerator, setup.model, setup.optimizer, setup.scheduler, background=background
        )
        stalls, totals = [], []
        for i in range(repeats):
            os.sync()
            start = time.perf_counter()
            writer.save(setup.root / f"stall-{background}-{i}", {"step": i}, "")
            stalls.append(time.perf_counter() - start)
            writer.wait()
            totals.append(time.perf_counter() - start)
            with contextlib.suppress(OSError):
                shutil.rmtree(setup.root / f"stall-{background}-{i}")
        stall_rows.append((background, statistics.median(stalls), statistics.median(totals)))
    return stall_rows


def table(
    n_params: int,
    repeats: int,
    cold: bool,
    rows: list[tuple[str, str, float]],
    sizes: dict[str, int],
    stall_rows: list[tuple[bool, float, float]],
) -> str:
    base = {
        # the plain writes and reads (the launcher's own row names safetensors too: not a baseline)
        (kind, plain): next(
            t for k, n, t in rows if k == kind and plain in n and "no fsync" not in n and "launcher" not in n
        )
        for kind in ("save", "load")
        for plain in ("torch", "safetensors")
    }
    gib = 2**30
    lines = [
        f"{n_params / 1e6:.0f}M parameters with AdamW state: the launcher's checkpoint {sizes['launcher'] / gib:.2f} "
        f"GiB, the `torch.save` file {sizes['torch'] / gib:.2f} GiB, the safetensors file "
        f"{sizes['safetensors'] / gib:.2f} GiB; medians of {repeats}; loads "
        + ("from the disk (page cache dropped before each)." if cold else "from the page cache (could not drop it)."),
        "",
        "| | way | time | GiB/s | speed vs one `torch.save`/`load` | speed vs one safetensors write/read |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for kind, name, t in rows:
        size = sizes["launcher" if "launcher" in name else "torch" if "torch" in name else "safetensors"]
        lines.append(
            f"| {kind} | {name} | {t:.2f} s | {size / gib / t:.2f} | {base[kind, 'torch'] / t:.2f}x | "
            f"{base[kind, 'safetensors'] / t:.2f}x |"
        )
    lines += [
        "",
        "| save | training stalls for | on disk after | stall vs synchronous |",
        "| --- | --- | --- | --- |",
    ]
    for background, stall, total in stall_rows:
        name = "background (`checkpoint.async_save: true`)" if background else "synchronous"
        lines.append(f"| {name} | {stall:.2f} s | {total:.2f} s | {stall / stall_rows[0][1]:.2f}x |")
    return "\n".join(lines)
