"""Compilation, activation checkpointing and the blocks they act on: pure decisions, then real runs (one process,
and two processes with DDP, FSDP and ZeRO-3)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from conftest import finish, read_metrics, run_cli, start_ranks
from safetensors.torch import load_file

from launcher import blocks, compiling
from launcher.models.gpt import GPT
from launcher.recipe import load_recipe
from launcher.recipe.schema import CompileConfig, Recompute

TIMEOUT = 240  # a hung collective fails the test instead of stalling the suite

CHAR_GPT = """\
model: {_component_: gpt, n_layer: 2, n_head: 2, n_embd: 32, dropout: 0.1}
data:
  dataset: {_component_: char_text, path: text.txt, block_size: 32, val_fraction: 0.1}
optimizer: {_component_: adamw, lr: 0.001}
train: {max_steps: 6, batch_size: 8, seed: 5}
eval: {every_steps: 3, every_epoch: false, max_batches: 2}
checkpoint: {every_steps: 3, keep_last: 3}
logging: {every_steps: 1, trackers: [jsonl], progress_bar: false}
"""


@pytest.fixture
def char_gpt(tmp_path: Path) -> Path:
    """A 2-block GPT on a made-up text (dropout on, so recomputation must restore the RNG to match)."""
    rng = random.Random(0)
    words = ["the", "king", "shall", "speak", "and", "we", "must", "hear", "him", "now"]
    (tmp_path / "text.txt").write_text(" ".join(rng.choice(words) for _ in range(4000)))
    path = tmp_path / "gpt.yaml"
    path.write_text(CHAR_GPT)
    return path


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in read_metrics(run_dir) if "train/loss" in r}


def assert_same_losses(a: dict[int, float], b: dict[int, float]) -> None:
    assert sorted(a) == sorted(b) and a, (a, b)
    assert all(abs(a[s] - b[s]) <= 1e-6 for s in a), (a, b)


# ------------------------------------------------------------------------------------------------ pure decisions


def test_which_blocks_are_recomputed():
    assert blocks.recomputed(4, 0) == [False] * 4
    assert blocks.recomputed(4, 1) == [True] * 4
    assert blocks.recomputed(5, 2) == [True, False, True, False, True]


def test_blocks_are_the_outermost_modules_of_the_named_classes():
    model = GPT(vocab_size=16, block_size=8, n_layer=3, n_head=2, n_embd=8)
    assert blocks.declared(model) == ("Block",)
    assert blocks.find_blocks(model, ("Block",)) == list(model.blocks)
    # A class inside a block is part of it, not a block of its own.
    assert blocks.find_blocks(model, ("Block", "CausalSelfAttention")) == list(model.blocks)
    assert blocks.missing(model, ("Block", "Layer")) == ["Layer"]


def test_recomputing_a_block_keeps_its_parameter_names_and_its_gradients():
    torch.manual_seed(0)
    model = GPT(vocab_size=16, block_size=8, n_layer=2, n_head=2, n_embd=8, dropout=0.5)
    other = GPT(vocab_size=16, block_size=8, n_layer=2, n_head=2, n_embd=8, dropout=0.5)
    other.load_state_dict(model.state_dict())
    assert blocks.checkpoint_blocks(blocks.find_blocks(other, ("Block",)), every=1) == 2
    assert list(other.state_dict()) == list(model.state_dict())
    x = torch.randint(0, 16, (4, 8))
    for m in (model, other):
        torch.manual_seed(1)
        m(x).logsumexp(-1).mean().backward()
    for (name, a), b in zip(model.named_parameters(), other.parameters(), strict=True):
        assert torch.equal(a.grad, b.grad), name


def test_the_shorthands_read_and_write_back(char_gpt: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(char_gpt.parent)
    recipe = load_recipe(char_gpt, ["train.compile=true", "train.activation_checkpointing={every: 2}"])
    assert recipe.train.compile == CompileConfig() and recipe.train.activation_checkpointing == Recompute(every=2)
    plain = recipe.to_dict()["train"]
    assert plain["compile"] is True and plain["activation_checkpointing"] == {"every": 2}
    off = load_recipe(char_gpt, ["train.activation_checkpointing=full"]).to_dict()["train"]
    assert off["compile"] is False and off["activation_checkpointing"] == "full"
    custom = load_recipe(char_gpt, ["train.compile={mode: max-autotune, regional: false}"]).train.compile
    assert custom.enabled and not custom.regional and compiling.options(custom)["mode"] == "max-autotune"


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.compile=3", "train.compile: expected true, false or a mapping, got a number (3)"),
        ("train.activation_checkpointing=half", "train.activation_checkpointing: expected none, full or {every: k}"),
        ("train.activation_checkpointing={every: -1}", "train.activation_checkpointing.every: must be >= 0, got -1"),
        ("train.compile={mode: fast}", "train.compile.mode: expected one of: default, reduce-overhead"),
    ],
)
def test_bad_values_are_one_line_each(char_gpt: Path, override: str, expected: str):
    proc = run_cli("validate", str(char_gpt), override, cwd=char_gpt.parent)
    assert proc.returncode == 2 and expected in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


# ------------------------------------------------------------------------------------------------------ runs


def train(char_gpt: Path, run_dir: Path, *overrides: str) -> str:
    proc = run_cli("train", str(char_gpt), f"run_dir={run_dir}", *overrides, cwd=char_gpt.parent)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout + proc.stderr


def test_activation_checkpointing_trains_the_same_run(char_gpt: Path, tmp_path: Path):
    train(char_gpt, tmp_path / "none")
    for name, policy, count in (("full", "full", 2), ("every2", "{every: 2}", 1)):
        said = train(char_gpt, tmp_path / name, f"train.activation_checkpointing={policy}")
        assert f"activation checkpointing: {count} of 2 blocks recompute in backward" in said
        assert_same_losses(losses(tmp_path / "none"), losses(tmp_path / name))


def test_a_compiled_run_resumes_uncompiled_and_the_other_way_round(char_gpt: Path, tmp_path: Path):
    compiled, plain = tmp_path / "compiled", tmp_path / "plain"
    said = train(char_gpt, compiled, "train.compile=true", "train.max_steps=3")
    assert "note: compiling 2 Block blocks one by one (backend inductor" in said and "compiled in about" in said
    assert next(r["compile_s"] for r in read_metrics(compiled) if "compile_s" in r) >= 0
    train(char_gpt, compiled, "train.max_steps=6", "resume=auto")  # uncompiled, from a compiled run's checkpoint
    train(char_gpt, plain, "train.max_steps=3")
    train(char_gpt, plain, "train.max_steps=6", "resume=auto", "train.compile={backend: aot_eager}")
    assert sorted(losses(compiled)) == sorted(losses(plain)) == list(range(1, 7))
    exported = {}
    for run in (compiled, plain):
        out = run / "model.safetensors"
        proc = run_cli("ckpt", "export", str(run / "checkpoints" / "step_00000003"), "--out", str(out))
        assert proc.returncode == 0, proc.stderr
        exported[run.name] = load_file(str(out))
    # The same keys, no `_orig_mod.`: either loads into a plain model.
    assert sorted(exported["compiled"]) == sorted(exported["plain"])
    vocab = exported["compiled"]["wte.weight"].shape[0]
    GPT(vocab_size=vocab, block_size=32, n_layer=2, n_head=2, n_embd=32).load_state_dict(exported["compiled"])


@pytest.mark.slow
def test_compiled_checkpointed_profiled_and_measured_runs_match_plain_ddp_on_two_processes(
    char_gpt: Path, tmp_path: Path
):
    """Compiled (aot_eager: the tracing and the graph, without generating kernels, to keep the test short) with
    every block recomputed, profiled on both ranks and measured (FLOP/s, MFU, peak memory), under each strategy:
    the losses of a plain DDP run, step for step, and a trace per rank."""

    def two(run_dir: Path, *overrides: str) -> list[tuple[int, str, str]]:
        procs = start_ranks(2, "train", str(char_gpt), f"run_dir={run_dir}", *overrides, cwd=char_gpt.parent)
        results = finish(procs, TIMEOUT)
        assert [rc for rc, _, _ in results] == [0, 0], results
        return results

    two(tmp_path / "plain")
    fast = [
        "train.compile={backend: aot_eager}",
        "train.activation_checkpointing=full",
        "profile={start_step: 3, steps: 2, ranks: all}",
        "train.peak_flops=1e12",
    ]
    for name, options in (
        ("ddp", []),
        ("fsdp", ["strategy.name=fsdp"]),
        ("zero3", ["strategy.name=deepspeed", "strategy.deepspeed.zero_stage=3"]),
    ):
        results = two(tmp_path / name, *fast, *options)
        assert "note: activation checkpointing: 2 of 2 blocks recompute in backward" in results[0][2]
        assert "compiled in about" in results[0][1] and "compiled in about" not in results[1][1]
        assert_same_losses(losses(tmp_path / "plain"), losses(tmp_path / name))
        rows = [r for r in read_metrics(tmp_path / name) if "train/loss" in r]
        assert all(r["flops_per_s"] > 0 and r["mfu"] > 0 and r["memory/peak_gib"] > 0 for r in rows), rows
        for rank in (0, 1):
            trace = json.loads((tmp_path / name / "profile" / f"rank{rank}.steps_3-4.pt.trace.json").read_text())
            steps = {e["name"] for e in trace["traceEvents"] if e.get("name", "").startswith("ProfilerStep#")}
            assert steps == {"ProfilerStep#3", "ProfilerStep#4"}, (name, rank, steps)
