"""Model FLOPs: the GPT's formula against torch's counter, counting leaves the numbers alone, the peak table."""

from __future__ import annotations

import time

import pytest
import torch
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode

from launcher.flops import CPU_ATTENTION, FlopMeter, compiled, device_peak, formula_flops, peak_flops
from launcher.metrics import Throughput, peak_memory
from launcher.models.gpt import GPT


def gpt_step(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    logits = model(idx)
    loss = F.cross_entropy(logits.view(-1, logits.size(-1)), idx.view(-1))
    loss.backward()
    return loss.detach()


@pytest.mark.parametrize(("n_layer", "n_embd", "seq_len"), [(2, 64, 32), (3, 32, 128)])
def test_the_gpt_formula_agrees_with_the_counter(n_layer: int, n_embd: int, seq_len: int):
    model = GPT(vocab_size=96, block_size=128, n_layer=n_layer, n_head=4, n_embd=n_embd)
    idx = torch.randint(0, 96, (2, seq_len))
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION) as counter:
        gpt_step(model, idx)
    counted = counter.get_total_flops()
    # The same matmuls; the one difference is that the counter also counts the attention scores a fused kernel
    # computes again in backward (2 x layers x width x seq_len per token), which model FLOPs (MFU's) leave out.
    recomputed = 2 * n_layer * n_embd * seq_len * idx.numel()
    assert formula_flops(model, idx) + recomputed == counted
    # Attention (here 12-20% of the total) is counted on CPU too: without it the two would be far apart.
    with FlopCounterMode(display=False) as plain:
        gpt_step(model, idx)
    assert plain.get_total_flops() < 0.95 * counted


def test_counting_leaves_losses_and_gradients_the_same_bit_for_bit():
    def train(count: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        torch.manual_seed(0)
        model = GPT(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=32, dropout=0.1)
        # A model without a formula of its own: the counter runs.
        model.flops_per_token = None  # type: ignore[assignment]
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        meter, losses = FlopMeter(model), []
        for i in range(3):
            idx = torch.randint(0, 64, (4, 32))
            if count and i == 0:
                with meter.counting(idx):
                    losses.append(gpt_step(model, idx))
            else:
                losses.append(gpt_step(model, idx))
            optimizer.step()
            optimizer.zero_grad()
        assert (meter.per_update is not None) == count
        return losses, [p.detach().clone() for p in model.parameters()]

    (losses_a, params_a), (losses_b, params_b) = train(count=True), train(count=False)
    assert all(torch.equal(a, b) for a, b in zip(losses_a, losses_b, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(params_a, params_b, strict=True))


def test_a_compiled_model_is_not_counted_unless_it_gives_a_formula():
    model = torch.nn.Linear(4, 2)
    assert not compiled(model)
    model.compile(backend="eager")  # compiles lazily: nothing runs here
    assert compiled(torch.nn.Sequential(model))
    meter = FlopMeter(model, may_count=False)
    with meter.counting(torch.zeros(3, 4)):
        model(torch.zeros(3, 4)).sum().backward()
    assert meter.per_update is None
    gpt = GPT(vocab_size=16, block_size=8, n_layer=1, n_head=1, n_embd=8)
    meter = FlopMeter(gpt, may_count=False)
    with meter.counting(torch.zeros(2, 8, dtype=torch.long)):
        pass
    assert meter.per_update == 2 * 8 * gpt.flops_per_token(8)


def test_the_peak_table_knows_each_gpu_by_its_device_name():
    assert peak_flops("NVIDIA H100 80GB HBM3", "bf16") == pytest.approx(989.4e12)
    assert peak_flops("NVIDIA H100 PCIe", "bf16") == pytest.approx(756e12)
    assert peak_flops("NVIDIA H200", "fp16") == pytest.approx(989.4e12)
    assert peak_flops("NVIDIA A100-SXM4-80GB", "tf32") == pytest.approx(156e12)
    assert peak_flops("NVIDIA A100 80GB PCIe", "fp32") == pytest.approx(19.5e12)
    assert peak_flops("NVIDIA A10", "bf16") == pytest.approx(125e12)  # not the A100's
    assert peak_flops("NVIDIA L4", "bf16") == pytest.approx(121e12)  # not the L40S's
    assert peak_flops("NVIDIA L40S", "bf16") == pytest.approx(362.1e12)
    assert peak_flops("NVIDIA GeForce RTX 4090", "bf16") == pytest.approx(165.2e12)
    assert peak_flops("AMD Instinct MI300X", "bf16") == pytest.approx(1307.4e12)
    assert peak_flops("Tesla V100-SXM2-32GB", "fp16") == pytest.approx(125e12)
    assert peak_flops("Tesla V100-SXM2-32GB", "bf16") is None  # no bf16 tensor cores
    assert peak_flops("NVIDIA A10G", "bf16") is None  # not an A10: unknown rather than wrong
    assert peak_flops("Some New GPU", "bf16") is None
    # On CPU only a peak given by hand is known.
    assert device_peak(None, torch.device("cpu"), "no") is None
    assert device_peak(3e12, torch.device("cpu"), "no") == 3e12


def test_throughput_gives_the_flop_rate_and_mfu_from_the_updates_since_the_last_row():
    throughput = Throughput(peak_flops=1e9)
    assert "flops_per_s" not in throughput.rates(updates=5)  # nothing measured yet
    throughput.measured(2e6)
    time.sleep(0.05)
    rates = throughput.rates(updates=10)
    assert 1e8 < rates["flops_per_s"] < 2e6 * 10 / 0.05 * 1.01
    assert rates["mfu"] == pytest.approx(rates["flops_per_s"] / 1e9)
    assert peak_memory(torch.device("cpu"))["memory/peak_gib"] > 0
