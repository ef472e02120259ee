"""Model FLOPs for throughput and MFU: this process's FLOPs of one update, counted once on the run's first update
(or given by the model's own formula), and the dense peak FLOP/s of one device.

A model may declare its training FLOPs (forward and backward) itself, which wins over counting:
`flops_per_token(seq_len) -> float` for a model of token sequences (inputs of shape (batch, time)), per token of a
sequence of `seq_len` tokens, or `flops_per_sample() -> float` for any other model, per sample.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils import flop_counter

# Dense (no sparsity) peak TFLOP/s of one device per matmul precision, from the vendors' data sheets; the first
# pattern that matches `torch.cuda.get_device_name()` wins, so the more specific names come first.
PEAK_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    (r"H100.*(PCIe|PCIE)", {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.2}),
    (r"H100 NVL", {"bf16": 835.0, "fp16": 835.0, "tf32": 418.0, "fp32": 60.0}),
    (r"\bH100\b", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),  # SXM
    (r"\bH200\b", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    (r"\bA100\b", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    (r"\bL40S\b", {"bf16": 362.1, "fp16": 362.1, "tf32": 183.0, "fp32": 91.6}),
    (r"\bA10\b", {"bf16": 125.0, "fp16": 125.0, "tf32": 62.5, "fp32": 31.2}),
    (r"\bL4\b", {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3}),
    (r"RTX 4090", {"bf16": 165.2, "fp16": 165.2, "tf32": 82.6, "fp32": 82.6}),  # fp32 accumulation
    (r"RTX 3090", {"bf16": 71.0, "fp16": 71.0, "tf32": 35.6, "fp32": 35.6}),
    (r"V100", {"fp16": 125.0, "fp32": 15.7}),  # no bf16 or tf32 tensor cores
    (r"MI300X", {"bf16": 1307.4, "fp16": 1307.4, "tf32": 653.7, "fp32": 163.4}),
)


# torch counts attention only for its GPU kernels; on CPU scaled_dot_product_attention runs this one.
def cpu_attention(query: Any, key: Any, value: Any, *args: Any, **kwargs: Any) -> int:
    return flop_counter.sdpa_flop_count(query, key, value)


def cpu_attention_backward(grad: Any, query: Any, key: Any, value: Any, *args: Any, **kwargs: Any) -> int:
    return flop_counter.sdpa_backward_flop_count(grad, query, key, value)


_aten = torch.ops.aten
CPU_ATTENTION = {
    _aten._scaled_dot_product_flash_attention_for_cpu: cpu_attention,
    _aten._scaled_dot_product_flash_attention_for_cpu_backward: cpu_attention_backward,
}


def peak_flops(device_name: str, precision: str) -> float | None:
    """Dense peak FLOP/s of one device called `device_name` (as `torch.cuda.get_device_name` says) for matmuls
    in `precision` (`bf16`, `fp16`, `tf32`, `fp32`); None for a device or precision not in the table."""
    for pattern, peaks in PEAK_TFLOPS:
        if re.search(pattern, device_name):
            tflops = peaks.get(precision)
            return None if tflops is None else tflops * 1e12
    return None


def matmul_precision(mixed_precision: str) -> str:
    """The precision the run's matmuls run in: the autocast dtype, else TF32 where torch allows it for fp32."""
    if mixed_precision in ("bf16", "fp16"):
        return mixed_precision
    return "fp32" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def device_peak(given: float | None, device: torch.device, mixed_precision: str) -> float | None:
    """The peak FLOP/s MFU is measured against: `train.peak_flops` when given, else the table's for this GPU."""
    if given is not None:
        return given
    if device.type != "cuda":
        return None
    return peak_flops(torch.cuda.get_device_name(device), matmul_precision(mixed_precision))


def formula_flops(model: torch.nn.Module, inputs: Any) -> float | None:
    """Forward and backward FLOPs of one micro-batch by the model's own formula; None where it declares none."""
    per_token = getattr(model, "flops_per_token", None)
    if callable(per_token) and isinstance(inputs, torch.Tensor) and inputs.dim() >= 2:
        return float(inputs.shape[0] * inputs.shape[1] * per_token(inputs.shape[1]))
    per_sample = getattr(model, "flops_per_sample", None)
    if callable(per_sample) and hasattr(inputs, "__len__"):
        return float(len(inputs) * per_sample())
    return None


class FlopMeter:
    """This process's FLOPs over the micro-batches of one update: the model's formula, or torch's counter
    around each micro-batch's forward and backward. The counter only watches the operations as they run (the
    numbers are the same bit for bit), under DDP, FSDP and DeepSpeed alike; collectives count for nothing. A
    compiled model is not counted (`may_count` False): compiling under the counter changes the run's numbers in
    their last bits, so only a formula gives its FLOPs."""

    def __init__(self, model: torch.nn.Module, may_count: bool = True):
        self.model = model  # unwrapped: the formula is the user's module's
        self.may_count = may_count
        self.flops = 0.0
        self.unknown = False

    @contextlib.contextmanager
    def counting(self, inputs: Any) -> Iterator[None]:
        by_formula = formula_flops(self.model, inputs)
        if by_formula is not None:
            self.flops += by_formula
            yield
        elif not self.may_count:
            self.unknown = True
            yield
        else:
            with flop_counter.FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION) as counter:
                yield
            self.flops += counter.get_total_flops()

    @property
    def per_update(self) -> float | None:
        return self.flops if self.flops > 0 and not self.unknown else None


def compiled(model: torch.nn.Module) -> bool:
    """Whether `model` or any module in it is compiled (in place, or wrapped by `torch.compile`)."""
    return any(
        getattr(m, "_compiled_call_impl", None) is not None or type(m).__name__ == "OptimizedModule"
        for m in model.modules()
    )
