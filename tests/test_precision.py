"""Mixed precision as a hand-written autocast loop has it, with real processes: under bf16 the tensor that reaches
the loss is the model's bf16 output (no fp32 copy of the logits, as Accelerate's `prepare` makes by itself), for
the built-in GPT and a tiny Hugging Face Llama, under DDP, FSDP2 on one and two processes and ZeRO-3; and the loss
still computes in fp32, as it did when it was given the fp32 copy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import finish, read_metrics, start_ranks
from test_distributed import TIMEOUT

from launcher.precision import Precision, keep_output_precision

# A loss that writes down, at every call, the dtype of what it was given, and how far its value is from the same
# cross-entropy computed on an fp32 copy outside autocast (what the loss computed before: within fp32 rounding).
SEEN = """\
import json, os
import torch
from torch.nn import functional as F


class SeenCrossEntropy(torch.nn.CrossEntropyLoss):
    def forward(self, output, targets):
        loss = super().forward(output, targets)
        with torch.autocast(output.device.type, enabled=False):
            fp32 = F.cross_entropy(output.detach().float(), targets, reduction=self.reduction)
        rank = os.environ.get("RANK", "0")
        with open(f"seen-{rank}.jsonl", "a") as f:
            gap = (loss.detach() - fp32).abs().max().item()
            row = {"dtype": str(output.dtype), "loss": str(loss.dtype), "gap": gap}
            f.write(json.dumps(row) + "\\n")
        return loss
"""
GPT = """\
model: {_component_: gpt, n_layer: 2, n_head: 2, n_embd: 32}
data:
  dataset: {_component_: char_text, path: TEXT, block_size: 32}
loss: {_component_: seen.SeenCrossEntropy}
optimizer: {_component_: adamw, lr: 0.003}
train: {max_steps: 3, batch_size: 4, seed: 1, mixed_precision: bf16}
eval: {every_steps: 3, every_epoch: false, max_batches: 1}
checkpoint: {save_final: false}
logging: {every_steps: 1, trackers: [jsonl], progress_bar: false}
strategy: {timeout_s: 60}
"""
LLAMA = (
    "{model_type: llama, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, num_attention_heads: 4, "
    "num_key_value_heads: 2, max_position_embeddings: 64, tie_word_embeddings: true}"
)
GPT_MODEL = "{_component_: gpt, n_layer: 2, n_head: 2, n_embd: 32}"
HF = GPT.replace(GPT_MODEL, f"{{_component_: hf_causal_lm, config: {LLAMA}}}")
HF = HF.replace(
    "{_component_: char_text, path: TEXT, block_size: 32}",
    "{_component_: hf_text, path: TEXT, tokenizer: bytes, block_size: 32, cache_dir: CACHE}",
)
STRATEGIES = {
    "ddp": (2, []),
    "fsdp-1": (1, ["strategy.name=fsdp"]),
    "fsdp-2": (2, ["strategy.name=fsdp"]),
    "zero3": (2, ["strategy.name=deepspeed", "strategy.deepspeed.zero_stage=3"]),
}


@pytest.fixture(scope="module")
def text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(400)))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("model", ["gpt", "hf"])
@pytest.mark.parametrize("name", list(STRATEGIES))
def test_the_loss_is_given_bf16_outputs_and_computes_in_fp32(text: Path, tmp_path: Path, model: str, name: str):
    if model == "hf":
        pytest.importorskip("transformers")
        pytest.importorskip("datasets")
    (tmp_path / "seen.py").write_text(SEEN)
    recipe = tmp_path / "r.yaml"
    recipe.write_text((GPT if model == "gpt" else HF).replace("TEXT", str(text)).replace("CACHE", str(tmp_path)))
    processes, mode = STRATEGIES[name]
    results = finish(start_ranks(processes, "train", str(recipe), f"run_dir={tmp_path / 'run'}", *mode, cwd=tmp_path),
                     TIMEOUT)  # fmt: skip
    assert [rc for rc, _, _ in results] == [0] * processes, results
    for rank in range(processes):
        rows = [json.loads(line) for line in (tmp_path / f"seen-{rank}.jsonl").read_text().splitlines()]
        assert len(rows) >= 3  # three updates (and an evaluation)
        assert {row["dtype"] for row in rows} == {"torch.bfloat16"}, rows  # no fp32 copy reached the loss
        assert {row["loss"] for row in rows} == {"torch.float32"}, rows
        assert max(row["gap"] for row in rows) < 1e-5, rows  # fp32 cross-entropy, not bf16 (~1e-2 off)
    assert len([r for r in read_metrics(tmp_path / "run") if "train/loss" in r]) == 3


class Head(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(8, 50)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def test_accelerate_wraps_the_forward_and_the_launcher_unwraps_it():
    """Accelerate's `prepare` still copies a bf16 model's outputs to fp32 (if a version stops, this test says so and
    the unwrapping can go); after `keep_output_precision` the output is bf16 under autocast, and fp32 outside."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # a run earlier in this process left its own
    accelerator = Accelerator(cpu=True, mixed_precision="bf16")
    model = accelerator.prepare(Head())
    x = torch.randn(4, 8)
    assert model(x).dtype == torch.float32  # Accelerate's fp32 copy
    assert keep_output_precision(model) and not keep_output_precision(model)
    precision = Precision.of(accelerator, "bf16")
    with precision.forward():
        output = model(x)
        loss = torch.nn.functional.cross_entropy(output, torch.zeros(4, dtype=torch.long))
    assert output.dtype == torch.bfloat16 and loss.dtype == torch.float32
    assert model(x).dtype == torch.float32  # no autocast left on the forward itself
    assert "forward" not in vars(model)  # the class's own forward again


def test_without_autocast_in_the_forward_the_loss_gets_a_region_of_its_own():
    """FSDP2's sharded runs and DeepSpeed compute in bf16 without Accelerate's autocast: the loss alone is upcast."""
    precision = Precision(None, torch.bfloat16, "cpu")
    logits = torch.randn(4, 10).bfloat16()
    with precision.forward(), precision.loss():
        assert torch.nn.functional.cross_entropy(logits, torch.zeros(4, dtype=torch.long)).dtype == torch.float32
    with Precision().forward(), Precision().loss():
        assert not torch.is_autocast_enabled("cpu")
