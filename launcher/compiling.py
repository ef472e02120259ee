"""`train.compile`: torch.compile applied in place, block by block (regional, the default) or to the whole model.

In place (`Module.compile`), not `torch.compile(module)`: the model keeps its class and its parameter names, so a
compiled run's checkpoints carry no `_orig_mod.` prefixes, and compiled and uncompiled runs resume each other's.
Compiling each block separately compiles one block class once and reuses it for every layer: seconds where the
whole model takes minutes, as in torchtitan and Accelerate's regional compilation.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from launcher.recipe.schema import CompileConfig


def options(cfg: CompileConfig) -> dict[str, Any]:
    """torch.compile's keyword arguments for `cfg`."""
    out: dict[str, Any] = {"backend": cfg.backend, "fullgraph": cfg.fullgraph, "dynamic": cfg.dynamic}
    if cfg.mode != "default":
        out["mode"] = cfg.mode
    return out


def compile_in_place(model: torch.nn.Module, blocks: list[torch.nn.Module], cfg: CompileConfig) -> str:
    """Compile `blocks` one by one (regional) or `model` as a whole; what was compiled, in words."""
    kwargs = options(cfg)
    if cfg.regional and blocks:
        for block in blocks:
            block.compile(**kwargs)
        names = sorted({type(b).__name__ for b in blocks})
        what = f"{len(blocks)} {'/'.join(names)} blocks one by one"
    else:
        model.compile(**kwargs)
        what = "the whole model" + (" (no blocks declared: see train.blocks)" if cfg.regional else "")
    return f"{what} (backend {cfg.backend}, mode {cfg.mode})"


class FirstUpdates:
    """How long compilation took: compiling happens inside the first update (and again for each new shape), so
    its cost is the first update's time less the second's."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.last = time.perf_counter()

    def tick(self) -> float | None:
        """Called after each update; the compile time in seconds once the second update is done, else None."""
        now = time.perf_counter()
        self.times.append(now - self.last)
        self.last = now
        if len(self.times) < 2:
            return None
        return max(self.times[0] - self.times[1], 0.0)
