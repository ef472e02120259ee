"""The bytes of tensors a training run saves for backward, per micro-batch: what a run's activation memory is.

    BENCH_SAVED_BYTES_FILE=out.json python -m bench.saved_bytes -- MODULE [ARGS...]
    e.g. python -m bench.saved_bytes -- launcher train recipe.yaml train.max_steps=3
         python -m bench.saved_bytes -- bench.loops torch v 3 --precision bf16 --tokens DIR

runs `python -m MODULE ARGS...` in this process inside `torch.autograd.graph.saved_tensors_hooks`. Every tensor
autograd saves (a custom `autograd.Function`'s `ctx.save_for_backward` too) passes through the pack hook, which adds
its storage's bytes, each storage once per forward (a view of the logits saved twice is one buffer in memory). A
new forward starts when a pack follows an unpack (backward has begun), so with gradient accumulation each
micro-batch is counted on its own. The largest forward's total goes to $BENCH_SAVED_BYTES_FILE as JSON
(`saved_bytes`, `forwards`), and to stderr.

Peak RSS on the CPU is blunt (the allocator keeps freed pages, other buffers fill the same peak); the saved bytes
are exact and the same on any device. They do not count tensors the training loop itself keeps referenced through
backward outside autograd (e.g. a Python variable holding the logits): `live_bytes` adds those, the bytes of every
tensor reachable from Python or saved by autograd when backward starts (largest over the micro-batches). Neither
sees a buffer that lives only for a moment (an fp32 copy of the logits made and freed inside the loss):
`peak_bytes`, the most bytes the CPU allocator held at once during the run (above what it held at the start),
does: the allocator's every allocation and free as the profiler records them (`profile_memory=True`), summed in
order. It is what `torch.cuda.max_memory_allocated` is on a GPU; the profiler slows the run, so keep it short.
"""

from __future__ import annotations

import gc
import json
import os
import runpy
import sys
import warnings
from pathlib import Path
from typing import Any

import torch


class SavedBytes:
    """The pack/unpack hooks and their counts."""

    def __init__(self) -> None:
        self.seen: set[int] = set()  # storages counted in the current forward
        self.current = 0
        self.largest = 0
        self.forwards = 0
        self.in_backward = False
        self.live_largest = 0

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.in_backward or self.forwards == 0:  # a new forward
            self.largest = max(self.largest, self.current)
            self.seen.clear()
            self.current = 0
            self.forwards += 1
            self.in_backward = False
        storage = tensor.untyped_storage()
        ptr = storage.data_ptr()
        if ptr and ptr not in self.seen:  # a storage of no bytes (an empty tensor) costs nothing
            self.seen.add(ptr)
            self.current += storage.nbytes()
        return tensor  # saved as autograd would: no copy, no extra memory

    def unpack(self, tensor: torch.Tensor) -> torch.Tensor:
        if not self.in_backward:  # backward's first unpack: what is alive now lives through backward
            self.in_backward = True
            self.live_largest = max(self.live_largest, live_tensor_bytes())
        return tensor

    def result(self) -> dict[str, int]:
        return {
            "saved_bytes": max(self.largest, self.current),
            "live_bytes": self.live_largest,
            "forwards": self.forwards,
        }


def live_tensor_bytes() -> int:
    """The bytes of every distinct storage of a tensor that Python can see (autograd's saved tensors are Python
    objects too once a pack hook has had them). Parameters, gradients and optimizer state count, as in any run."""
    seen: dict[int, int] = {}
    with warnings.catch_warnings():  # isinstance on some modules' objects touches deprecated attributes
        warnings.simplefilter("ignore")
        tensors = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor)]
    for obj in tensors:
        if obj.device.type != "meta":
            try:
                storage = obj.untyped_storage()
            except (RuntimeError, NotImplementedError):  # sparse, nested or functional tensors: no plain storage
                continue
            if storage.data_ptr():
                seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def peak_allocated(profile: torch.profiler.profile) -> int:
    """The most bytes the CPU allocator held at once, from a profile's memory events (allocations positive, frees
    negative), above what it held when the profile began."""
    events = [e for e in profile.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    held = peak = 0
    for event in events:
        if event.device_type() == torch.autograd.DeviceType.CPU:
            held += event.nbytes()
            peak = max(peak, held)
    return peak


def run(module: str, args: list[str]) -> dict[str, Any]:
    """`python -m module args` in this process, counted; its exit status is returned with the counts."""
    counts = SavedBytes()
    sys.argv = [module, *args]
    status: Any = 0
    memory = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
    with memory, torch.autograd.graph.saved_tensors_hooks(counts.pack, counts.unpack):
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        except SystemExit as e:  # the launcher's CLI exits with its status
            status = e.code
    return {**counts.result(), "peak_bytes": peak_allocated(memory), "status": status}


def main() -> None:
    argv = sys.argv[1:]
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        raise SystemExit(__doc__)
    out = run(argv[0], argv[1:])
    print(f"saved_bytes: {json.dumps(out)}", file=sys.stderr)
    if os.environ.get("BENCH_SAVED_BYTES_FILE"):
        Path(os.environ["BENCH_SAVED_BYTES_FILE"]).write_text(json.dumps(out))
    status = out["status"]
    sys.exit(status if isinstance(status, int) else 1)


if __name__ == "__main__":
    main()
