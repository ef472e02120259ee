"""The chunked loss (`train.chunked_loss`): the output projection and cross-entropy of a causal LM in chunks of
tokens equal the plain loss and its gradients (fp32 within 1e-6, bf16 within its rounding), in evaluation too,
compiled, and in real runs: on two processes under FSDP2 and ZeRO-3, with activation checkpointing, and a
SIGKILLed run resumes bitwise. Which runs use it (`auto`) and the one-line notes where it cannot be used."""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path

import pytest
import torch
from conftest import finish, read_metrics, start_ranks
from test_distributed import TIMEOUT
from torch.nn import functional as F

from launcher import checkpoint, chunked_loss
from launcher.chunked_loss import ChunkedLinear, choose, chunk_rows
from launcher.models.gpt import GPT


def plain_and_chunked(dtype: torch.dtype | None, monkeypatch: pytest.MonkeyPatch) -> tuple[list, list]:
    """Loss, input gradient and weight gradient of the plain loss and of the chunked one (in several chunks, with
    targets that do not count), under autocast to `dtype` (None: fp32)."""
    monkeypatch.setattr(chunked_loss, "CHUNK_VALUES", 64 * 100)  # 64 tokens a chunk: 5 chunks and a part
    torch.manual_seed(0)
    head = ChunkedLinear(32, 100, bias=False)
    hidden = torch.randn(2, 150, 32)
    targets = torch.randint(0, 100, (2, 150))
    targets[:, ::7] = -100
    results = []
    for chunked in (False, True):
        h = hidden.clone().requires_grad_()
        head.weight.grad = None
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            loss = head(h, targets) if chunked else F.cross_entropy(head(h).reshape(-1, 100), targets.reshape(-1))
        loss.backward()
        results.append([loss.detach(), h.grad, head.weight.grad])
    return results[0], results[1]


def test_the_chunked_loss_and_its_gradients_equal_the_plain_ones_in_fp32(monkeypatch: pytest.MonkeyPatch):
    plain, chunked = plain_and_chunked(None, monkeypatch)
    for a, b in zip(plain, chunked, strict=True):
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)


def test_the_chunked_loss_and_its_gradients_equal_the_plain_ones_in_bf16(monkeypatch: pytest.MonkeyPatch):
    plain, chunked = plain_and_chunked(torch.bfloat16, monkeypatch)
    assert chunked[0].dtype == torch.float32  # the loss itself in fp32, as autocast computes cross-entropy
    torch.testing.assert_close(chunked[0], plain[0], rtol=1e-5, atol=1e-5)  # the same bf16 logits, fp32 softmax
    # Gradients: the same bf16 matmuls; the weight's sums its chunks in fp32 where the plain one rounds to bf16.
    for a, b in zip(plain[1:], chunked[1:], strict=True):
        torch.testing.assert_close(b, a, rtol=2e-2, atol=1e-2 * a.abs().max().item())


def test_evaluation_scores_each_token_as_the_plain_loss_does(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(chunked_loss, "CHUNK_VALUES", 64 * 100)
    head = ChunkedLinear(32, 100, bias=False)
    hidden, targets = torch.randn(3, 50, 32), torch.randint(0, 100, (3, 50))
    targets[0, :5] = -100
    losses, right, counted = head(hidden, targets, "none")
    logits = head(hidden)
    plain = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    torch.testing.assert_close(losses, plain, rtol=1e-6, atol=1e-6)
    assert torch.equal(right.bool(), (logits.argmax(-1) == targets) & (targets != -100))
    assert torch.equal(counted.bool(), targets != -100)


def test_a_compiled_gpt_gives_the_chunked_loss_and_gradients_of_the_eager_one():
    torch.manual_seed(0)
    model = GPT(vocab_size=300, block_size=16, n_layer=1, n_head=2, n_embd=16)
    idx, targets = torch.randint(0, 300, (2, 16)), torch.randint(0, 300, (2, 16))
    grads = []
    for compiled in (False, True):
        model.zero_grad()
        if compiled:
            model.compile(backend="aot_eager")
        loss = model(idx, targets)
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-6, atol=1e-6)
    for a, b in zip(grads[0][1], grads[1][1], strict=True):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)


def test_chunks_hold_a_bounded_number_of_logits():
    assert chunk_rows(16 * 1024, 50304) == 664  # 33M logits a chunk, a multiple of 8 tokens
    assert chunk_rows(100, 50304) == 100  # never more than the tokens there are
    assert chunk_rows(10**6, 10**9) == 8


def test_auto_chunks_a_large_vocabulary_and_plain_cross_entropy_only():
    big, small = GPT(vocab_size=50304, block_size=8, n_layer=0), GPT(vocab_size=256, block_size=8, n_layer=0)
    assert choose("auto", big, None, None) == (True, None)
    assert choose("auto", big, torch.nn.CrossEntropyLoss(), None) == (True, None)
    assert choose("auto", small, None, None) == (False, None)
    assert choose(True, small, None, None) == (True, None)
    assert choose(False, big, None, None) == (False, None)
    smoothed = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    assert choose("auto", big, smoothed, None) == (False, None)
    on, note = choose(True, big, smoothed, None)
    assert not on and note == (
        "note: train.chunked_loss: the loss (CrossEntropyLoss) is not plain cross-entropy; the plain loss is used"
    )
    on, note = choose(True, torch.nn.Linear(2, 2), None, None)
    assert not on and "Linear has no separable output projection" in note


def test_a_hugging_face_classifier_has_no_head_to_chunk():
    transformers = pytest.importorskip("transformers")
    from launcher.models import hf

    config = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, vocab_size=64, num_labels=2)  # fmt: skip
    classifier = transformers.LlamaForSequenceClassification(config)
    on, note = choose(True, classifier, None, hf.chunk_head)
    assert not on and note.startswith("note: train.chunked_loss: LlamaForSequenceClassification has no separable")
    causal = transformers.LlamaForCausalLM(config)
    keys = list(causal.state_dict())
    ids = torch.randint(0, 64, (2, 12))
    plain = causal(input_ids=ids, labels=ids).loss
    assert choose(True, causal, None, hf.chunk_head) == (True, None)
    assert list(causal.state_dict()) == keys  # checkpoints and exports are as before
    assert causal(input_ids=ids).logits.shape == (2, 12, 64)  # without labels, the model's own forward
    torch.testing.assert_close(causal(input_ids=ids, labels=ids), plain, rtol=1e-6, atol=1e-6)


# A GPT with a large vocabulary, so that a micro-batch (8 x 128 tokens) is two chunks.
RECIPE = """\
model: {_component_: gpt, n_layer: 2, n_head: 2, n_embd: 32}
data:
  dataset: {_component_: char_text, path: TEXT, block_size: 128}
optimizer: {_component_: adamw, lr: 0.003}
train: {max_steps: 8, batch_size: 8, seed: 2, chunked_loss: true}
eval: {every_steps: 4, every_epoch: false, max_batches: 2}
checkpoint: {every_steps: 2, keep_last: 5}
logging: {every_steps: 1, trackers: [jsonl], progress_bar: false}
strategy: {timeout_s: 60}
"""
VOCAB = "model.vocab_size=50304"


@pytest.fixture(scope="module")
def text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(300)))
    return path


def train(tmp_path: Path, text: Path, name: str, *overrides: str, processes: int = 2) -> dict[int, tuple]:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.replace("TEXT", str(text)))
    procs = start_ranks(processes, "train", str(recipe), f"run_dir={tmp_path / name}", VOCAB, *overrides, cwd=tmp_path)
    results = finish(procs, TIMEOUT)
    assert [rc for rc, _, _ in results] == [0] * processes, results
    return metrics(tmp_path / name)


def metrics(run_dir: Path) -> dict[int, tuple]:
    rows = read_metrics(run_dir)
    return {r["step"]: (r.get("train/loss"), r.get("val/loss"), r.get("grad_norm")) for r in rows if "step" in r}


def close(a: dict[int, tuple], b: dict[int, tuple], tolerance: float) -> bool:
    values = [(x, y) for step in a for x, y in zip(a[step], b[step], strict=True) if x is not None]
    return a.keys() == b.keys() and all(abs(x - y) <= tolerance * max(1.0, abs(x)) for x, y in values)


@pytest.mark.slow
def test_two_processes_train_the_same_run_with_the_chunked_loss_under_ddp_and_fsdp(tmp_path: Path, text: Path):
    """DDP with the plain loss is the reference; the chunked loss under DDP with activation checkpointing and
    FSDP2 trains the same run (fp32: the sums of the chunks and of the shards in another order). Under ZeRO-3 the
    chunked loss's outputs and upcast are tests/test_precision.py's."""
    plain = train(tmp_path, text, "plain", "train.chunked_loss=false")
    chunked = {
        "ddp+recompute": train(tmp_path, text, "ddp", "train.activation_checkpointing=full"),
        "fsdp": train(tmp_path, text, "fsdp", "strategy.name=fsdp"),
    }
    assert len([v for v in plain.values() if v[1] is not None]) == 2  # evaluated twice, with the chunked head too
    for name, run in chunked.items():
        assert close(plain, run, 1e-4), (name, plain, run)


@pytest.mark.slow
def test_a_killed_run_with_the_chunked_loss_resumes_bitwise(tmp_path: Path, text: Path):
    full = train(tmp_path, text, "full", processes=1)
    recipe = tmp_path / "r.yaml"
    crashed = tmp_path / "crashed"
    procs = start_ranks(1, "train", str(recipe), f"run_dir={crashed}", VOCAB, cwd=tmp_path)
    deadline = time.monotonic() + TIMEOUT
    while not [s for s in checkpoint.complete_steps(crashed / "checkpoints") if s >= 4]:
        assert time.monotonic() < deadline and procs[0].poll() is None, finish(procs, 1)
        time.sleep(0.05)
    procs[0].send_signal(signal.SIGKILL)
    procs[0].wait()
    resumed = finish(start_ranks(1, "train", str(recipe), f"run_dir={crashed}", VOCAB, "resume=auto", cwd=tmp_path),
                     TIMEOUT)  # fmt: skip
    assert resumed[0][0] == 0, resumed
    assert metrics(crashed) == full  # bitwise: every loss, val loss and gradient norm


def test_plan_counts_what_the_chunked_loss_keeps_instead_of_the_logits(tmp_path: Path, text: Path):
    from conftest import run_cli

    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.replace("TEXT", str(text)))
    shown = {}
    for setting in ("false", "true"):
        done = run_cli("plan", str(recipe), VOCAB, f"train.chunked_loss={setting}", cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        found = re.search(r"activations   per process.*\n\s+none ([\d.]+) (GiB|MiB)", done.stdout)
        assert found, done.stdout
        shown[setting] = float(found[1]) * (1024 if found[2] == "GiB" else 1)
    # Plain, the fp32 log-probabilities alone are 8 x 128 x 50304 x 4 bytes = 196 MiB; chunked, the weight's
    # gradient (6 MiB) and the hidden states' take their place.
    assert shown["false"] > 196 > 4 * shown["true"]
