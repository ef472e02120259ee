"""Where a run's numbers go: `metrics.jsonl`, Accelerate's trackers (TensorBoard, ...), and the run record."""

from __future__ import annotations

import contextlib
import json
import math
import platform
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

GIB = 2**30


class JsonlWriter:
    """One JSON object per line: `step`, `time` (Unix seconds, when the line was written) and the same tags
    TensorBoard gets. Flushed per line, so a crash loses at most the line being written."""

    def __init__(self, path: Path):
        self.file = path.open("a", encoding="utf-8")

    def write(self, step: int, values: dict[str, float]) -> None:
        row = {"step": step, "time": round(time.time(), 3), **{k: _finite_or_none(v) for k, v in values.items()}}
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def _finite_or_none(v: float) -> float | None:
    # JSON has no NaN or Infinity; null keeps each line valid for every reader.
    return v if math.isfinite(v) else None


class Throughput:
    """Samples, tokens and model FLOPs per second of training since the last `rates()` call, and the model FLOPs
    utilisation against `peak_flops` (FLOP/s of one device) where that is known."""

    def __init__(self, peak_flops: float | None = None, note: Callable[[dict[str, Any]], None] | None = None):
        self.start = time.perf_counter()
        self.samples = 0
        self.tokens = 0
        self.peak_flops = peak_flops
        self.note = note  # told once what the FLOPs per update are, for the run's record
        self.flops_per_update: float | None = None  # this process's, measured on the first update

    def measured(self, flops_per_update: float | None) -> None:
        self.flops_per_update = flops_per_update
        if self.note is not None:
            self.note({"flops_per_update": flops_per_update, "peak_flops": self.peak_flops})

    def add(self, samples: int, tokens: int) -> None:
        self.samples += samples
        self.tokens += tokens

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent inside (evaluation, checkpoints) is not training time: it stays out of the rates."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.start += time.perf_counter() - start

    def rates(self, updates: int = 0) -> dict[str, float]:
        """The rates since the last call; `updates`: the updates done since then (for the FLOP rate)."""
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        out = {"throughput/samples_per_s": self.samples / elapsed}
        if self.tokens:
            out["throughput/tokens_per_s"] = self.tokens / elapsed
        if self.flops_per_update is not None and updates:
            out["flops_per_s"] = self.flops_per_update * updates / elapsed
            if self.peak_flops:
                out["mfu"] = out["flops_per_s"] / self.peak_flops
        self.start, self.samples, self.tokens = time.perf_counter(), 0, 0
        return out


def peak_memory(device: Any) -> dict[str, float]:
    """This process's peak memory in GiB: on a GPU, allocated and reserved by torch since the last call (the peak
    is reset); elsewhere the process's peak resident set since it started."""
    import torch

    if device.type == "cuda":
        out = {
            "memory/peak_gib": torch.cuda.max_memory_allocated(device) / GIB,
            "memory/peak_reserved_gib": torch.cuda.max_memory_reserved(device) / GIB,
        }
        torch.cuda.reset_peak_memory_stats(device)
        return out
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return {"memory/peak_gib": peak * (1 if sys.platform == "darwin" else 1024) / GIB}


def environment(world_size: int, distributed_type: str, mixed_precision: str, device: str) -> dict[str, Any]:
    """What a run ran on, for `env.json`: enough to tell two runs' setups apart later."""
    import accelerate
    import torch

    import launcher

    return {
        "launcher": launcher.__version__,
        "torch": torch.__version__,
        "accelerate": accelerate.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
        "world_size": world_size,
        "distributed_type": distributed_type,
        "mixed_precision": mixed_precision,
        "device": device,
        "cuda": torch.version.cuda,
        "git_commit": git_commit(),
        "command": sys.argv,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def git_commit(cwd: Path | None = None) -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def flat_hparams(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The recipe flattened to `a.b` keys of scalars, as TensorBoard's hparams view accepts."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_hparams(value, name + "."))
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
        else:
            out[name] = str(value)
    return out
