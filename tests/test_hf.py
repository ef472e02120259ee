"""Hugging Face models, tokenizers and datasets in a recipe, with real processes: a tiny Llama built from a config
trains as a causal LM and as a classifier on one and two processes under DDP, FSDP and ZeRO-3, resumes bitwise after
SIGKILL, and exports a directory `from_pretrained` loads whose logits are the trained model's. The tokenizer is a
byte-level BPE the tests train themselves; nothing is downloaded. Bad input is refused in one line, exit 2."""

from __future__ import annotations

import csv
import json
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import REPO, SHAKESPEARE, finish, read_metrics, run_cli, start_ranks
from test_distributed import TIMEOUT

from launcher import checkpoint

pytest.importorskip("datasets")
pytest.importorskip("transformers")

LLAMA = (
    "{model_type: llama, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, num_attention_heads: 4, "
    "num_key_value_heads: 2, max_position_embeddings: 64, tie_word_embeddings: true, attention_dropout: 0.1}"
)
CAUSAL = """\
model: {_component_: hf_causal_lm, config: LLAMA}
data:
  dataset:
    {_component_: hf_text, path: DATA/text.jsonl, tokenizer: DATA/tokenizer, block_size: 32, cache_dir: DATA/cache}
optimizer: {_component_: adamw, lr: 0.003}
train: {max_steps: 12, batch_size: 4, seed: 5}
eval: {every_steps: 6, every_epoch: false}
checkpoint: {every_steps: 4, keep_last: 3}
logging: {every_steps: 1, trackers: [jsonl], progress_bar: false}
strategy: {timeout_s: 60}
"""
CLASSIFY = (
    CAUSAL.replace("hf_causal_lm", "hf_classifier")
    .replace("{_component_: hf_text, path: DATA/text.jsonl", "{_component_: hf_classification, path: DATA/labels.csv")
    .replace("block_size: 32", "max_length: 32")
)
STRATEGIES = {
    "ddp": [],
    "fsdp": ["strategy.name=fsdp"],
    "zero3": ["strategy.name=deepspeed", "strategy.deepspeed.zero_stage=3"],
}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A byte-level BPE tokenizer trained here, paragraphs as JSON lines, and a CSV of paragraphs labelled by length."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("hf_data")
    corpus = SHAKESPEARE if SHAKESPEARE.is_file() else REPO / "docs" / "recipes.md"
    text = corpus.read_text()[:120_000]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator([text], trainer)
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>").save_pretrained(out / "tokenizer")
    paragraphs = [p for p in text.split("\n\n") if p.strip()]
    (out / "text.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs))
    with open(out / "labels.csv", "w", newline="") as f:
        rows = csv.writer(f)
        rows.writerow(["text", "label"])
        rows.writerows([p, "long" if len(p) > 150 else "short"] for p in paragraphs[:300])
    return out


def recipe(data: Path, tmp_path: Path, template: str = CAUSAL, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(template.replace("LLAMA", LLAMA).replace("DATA", str(data)))
    return path


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in read_metrics(run_dir) if "train/loss" in r}


def kill_after_a_checkpoint(procs: list, checkpoints: Path, past: int = 3) -> int:
    """SIGKILL every rank once a checkpoint after step `past` is complete (by default one past the first), as when
    a node is lost; its step."""
    deadline = time.monotonic() + TIMEOUT
    while not [s for s in checkpoint.complete_steps(checkpoints) if s > past]:
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), finish(procs, 1)
        time.sleep(0.05)
    for p in procs:
        p.send_signal(signal.SIGKILL)
    for p in procs:
        p.wait()
    return max(checkpoint.complete_steps(checkpoints))


def logged_val_loss(run_dir: Path) -> float:
    return [r["val/loss"] for r in read_metrics(run_dir) if "val/loss" in r][-1]


def val_loss(model: torch.nn.Module, data: Path) -> tuple[float, torch.Tensor]:
    """The model's mean loss on the val blocks, as the launcher logs val/loss, and its logits."""
    from launcher.data.hf import HFText

    val = HFText(str(data / "text.jsonl"), str(data / "tokenizer"), "val", 32, cache_dir=str(data / "cache"))
    ids = torch.stack([val[i]["input_ids"] for i in range(len(val))])
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1]
    per_sample = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none").mean(1)
    return per_sample.mean().item(), logits


def exported_logits_match(run_dir: Path, data: Path, out: Path) -> None:
    """`from_pretrained` loads the export with no missing, unexpected or mismatched key and ties the head; its
    logits on the val blocks give the val/loss the launcher logged for the trained model at the same step."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    proc = run_cli("ckpt", "export", str(run_dir / "checkpoints" / "latest"), "--format", "hf", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, as trained
    assert AutoTokenizer.from_pretrained(out)("To be")["input_ids"]
    assert abs(val_loss(model, data)[0] - logged_val_loss(run_dir)) < 1e-5


def exported_generation_stops_at_end_of_text(out: Path) -> None:
    """The export's config and generation config carry the tokenizer's special ids (not Llama's defaults, 1 and 2,
    which are other tokens here) and the key-value cache; `generate()` stops at the end-of-text token."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    eos = tokenizer.eos_token_id
    ids = {"bos": eos, "eos": eos, "pad": tokenizer.pad_token_id}  # no bos token: it begins with eos, as GPT-2
    for config in (model.config, GenerationConfig.from_pretrained(out)):
        assert {k: getattr(config, f"{k}_token_id") for k in ids} == ids
    assert model.config.use_cache is True
    # A model whose end-of-text logit dominates stops after one token, if generate() knows which token that is.
    model.lm_head.register_forward_hook(lambda m, args, logits: logits.index_fill(-1, torch.tensor([eos]), 1e4))
    prompt = tokenizer("To be", return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert generated[0, prompt["input_ids"].shape[1] :].tolist() == [eos]


def exported_classifier_loads(run_dir: Path, out: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    proc = run_cli("ckpt", "export", str(run_dir / "checkpoints" / "latest"), "--format", "hf", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    model, info = AutoModelForSequenceClassification.from_pretrained(out, output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}
    assert model.config.id2label == {0: "long", 1: "short"} and model.config.pad_token_id is not None


def test_a_causal_lm_trains_on_one_process_and_exports_what_from_pretrained_loads(data: Path, tmp_path: Path):
    run_dir = tmp_path / "run"
    proc = run_cli("train", str(recipe(data, tmp_path)), f"run_dir={run_dir}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = losses(run_dir)
    assert sorted(rows) == list(range(1, 13)) and rows[12] < rows[1]
    assert sorted((run_dir / "checkpoints" / "step_00000012" / "hf").iterdir())
    exported_logits_match(run_dir, data, tmp_path / "export")
    exported_generation_stops_at_end_of_text(tmp_path / "export")
    # Sharded: several safetensors files and their index, as from_pretrained expects them.
    shards = tmp_path / "shards"
    proc = run_cli(
        "ckpt",
        "export",
        str(run_dir / "checkpoints" / "latest"),
        "--format",
        "hf",
        "--out",
        str(shards),
        "--max-shard-size",
        "20KB",
    )
    assert proc.returncode == 0, proc.stderr
    index = json.loads((shards / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert len(list(shards.glob("model-*.safetensors"))) == len(set(index["weight_map"].values()))


def save_llama(out: Path, vocab_size: int, tied: bool, seed: int) -> Any:
    """A tiny Llama as `LLAMA` describes it, initialised from `seed` and saved as a pretrained directory; its config."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "llama",
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
    )
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    return config


def test_a_pretrained_local_model_is_trained_from_its_weights(data: Path, tmp_path: Path):
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    config = save_llama(tmp_path / "pretrained", 400, tied=False, seed=9)
    # A learning rate of 1e-30 leaves the weights as loaded: the export must be the pretrained model's.
    args = ["~model.config", f"model.pretrained={tmp_path / 'pretrained'}", "optimizer.lr=1e-30", "train.max_steps=1"]
    proc = run_cli(
        "train", str(recipe(data, tmp_path)), f"run_dir={tmp_path / 'run'}", *args, "optimizer.weight_decay=0"
    )
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "export"
    proc = run_cli(
        "ckpt", "export", str(tmp_path / "run" / "checkpoints" / "latest"), "--format", "hf", "--out", str(out)
    )
    assert proc.returncode == 0, proc.stderr
    before, after = load_file(tmp_path / "pretrained" / "model.safetensors"), load_file(out / "model.safetensors")
    assert before.keys() == after.keys() and all(torch.allclose(before[k], after[k], atol=1e-6) for k in before)

    small = tmp_path / "small"
    AutoModelForCausalLM.from_config(AutoConfig.for_model(**{**config.to_dict(), "vocab_size": 100})).save_pretrained(
        small
    )
    proc = run_cli("validate", str(recipe(data, tmp_path)), "~model.config", f"model.pretrained={small}")
    assert proc.returncode == 2
    assert "model: the tokenizer has 320 tokens, more than the model's embedding of 100" in proc.stderr


@pytest.mark.slow
def test_compile_and_activation_checkpointing_train_a_hugging_face_model_the_same(data: Path, tmp_path: Path):
    path = recipe(data, tmp_path)
    runs = {}
    for name, extra in {
        "plain": [],
        "fast": ["train.compile={backend: aot_eager}", "train.activation_checkpointing=full"],
    }.items():
        proc = run_cli("train", str(path), f"run_dir={tmp_path / name}", "train.max_steps=4", *extra, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        runs[name] = (losses(tmp_path / name), proc.stdout + proc.stderr)
    assert "compiling 2 LlamaDecoderLayer blocks one by one" in runs["fast"][1]
    assert "activation checkpointing: 2 of 2 blocks recompute in backward" in runs["fast"][1]
    assert runs["fast"][0] == runs["plain"][0] and sorted(runs["plain"][0]) == [1, 2, 3, 4]


@pytest.mark.slow
# ZeRO-3's format (test_resume.py kills DDP runs of every kind; test_tensor_parallel.py resumes and exports a tiny
# Llama's DCP checkpoints, and kills FSDP runs).
@pytest.mark.parametrize("name", ["zero3"])
def test_a_killed_two_process_run_resumes_bitwise_and_exports(data: Path, tmp_path: Path, name: str):
    path = recipe(data, tmp_path, CAUSAL)
    full, crashed = tmp_path / "full", tmp_path / "crashed"
    mode = STRATEGIES[name]
    results = finish(start_ranks(2, "train", str(path), f"run_dir={full}", *mode, cwd=tmp_path), TIMEOUT)
    assert [rc for rc, _, _ in results] == [0, 0], results

    procs = start_ranks(2, "train", str(path), f"run_dir={crashed}", *mode, cwd=tmp_path)
    resumed_from = kill_after_a_checkpoint(procs, crashed / "checkpoints")
    results = finish(
        start_ranks(2, "train", str(path), f"run_dir={crashed}", *mode, "resume=auto", cwd=tmp_path), TIMEOUT
    )
    assert [rc for rc, _, _ in results] == [0, 0], results
    assert f"at step {resumed_from}" in results[0][1]
    assert losses(crashed) == losses(full) and sorted(losses(full)) == list(range(1, 13))  # bitwise
    # The resumed run takes the FLOPs the first attempt measured on its first update, instead of counting again.
    flops = [json.loads((d / "env.json").read_text())["flops_per_update"] for d in (full, crashed)]
    assert flops[0] == flops[1] > 0
    exported_logits_match(full, data, tmp_path / "export")


def test_a_classifier_trains_on_two_processes_and_exports(data: Path, tmp_path: Path):
    """Its head and labels under DDP, and the export `from_pretrained` loads."""
    path = recipe(data, tmp_path, CLASSIFY)
    full = tmp_path / "full"
    results = finish(start_ranks(2, "train", str(path), f"run_dir={full}", *STRATEGIES["ddp"], cwd=tmp_path), TIMEOUT)
    assert [rc for rc, _, _ in results] == [0, 0], results
    assert sorted(losses(full)) == list(range(1, 13)) and any("val/accuracy" in r for r in read_metrics(full))
    exported_classifier_loads(full, tmp_path / "export")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["hf_causal_lm", "hf_classify", "hf_sft_lora"])
def test_the_shipped_recipes_run_as_their_headers_say(data: Path, tmp_path: Path, name: str):
    chats = REPO / "recipes" / "data" / "chat_sample.jsonl"
    path = {"hf_causal_lm": data / "text.jsonl", "hf_classify": data / "labels.csv", "hf_sft_lora": chats}[name]
    run_dir = tmp_path / "run"
    short = ["train.max_steps=6", "eval.every_steps=3", "eval.every_epoch=false", "eval.max_batches=2"]
    short.append("checkpoint.every_steps=3")  # with a small corpus an epoch ends inside the 6 steps: no eval there
    proc = run_cli(
        "train",
        str(REPO / "recipes" / f"{name}.yaml"),
        f"data.dataset.path={path}",
        f"run_dir={run_dir}",
        f"data.dataset.cache_dir={data / 'cache'}",
        *short,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows if "val/accuracy" in r] == [3, 6]
    assert (run_dir / "checkpoints" / "step_00000006" / "hf" / "tokenizer.json").is_file()
    if name == "hf_sft_lora":  # a language model's perplexity, and the chat template exported with its tokenizer
        assert [r["step"] for r in rows if "val/perplexity" in r] == [3, 6]
        assert (run_dir / "checkpoints" / "step_00000006" / "hf" / "chat_template.jinja").is_file()


REFUSALS = {
    "no model dir": (["~model.config", "model.pretrained=DATA/nowhere"], "model.pretrained: no such directory"),
    "no config": (["~model.config", "model.pretrained=DATA/tokenizer"], "has no config.json"),
    "vocab": (["model.config.vocab_size=100"], "model: the tokenizer has"),
    "column": (["data.dataset.column=txt"], "has no column 'txt' (its columns: text)"),
    "block size": (["data.dataset.block_size=128"], "model: the data's block_size 128 is more than the model's 64"),
    "no tokenizer": (["data.dataset.tokenizer=DATA/none"], "tokenizer: no such directory"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_bad_input_is_refused_in_one_line_before_anything_runs(data: Path, tmp_path: Path, case: str):
    overrides, expected = REFUSALS[case]
    proc = run_cli(
        "train",
        str(recipe(data, tmp_path)),
        f"run_dir={tmp_path / 'run'}",
        *[o.replace("DATA", str(data)) for o in overrides],
        cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert len(lines) == 1 and expected in lines[0], proc.stderr
    assert not (tmp_path / "run").exists()


def test_a_recipe_that_needs_the_hf_extra_names_it_when_it_is_missing(data: Path, tmp_path: Path):
    blocker = tmp_path / "blocked"
    (blocker / "datasets").mkdir(parents=True)
    (blocker / "datasets" / "__init__.py").write_text("raise ImportError('datasets is not installed')\n")
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": f"{blocker}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run(
        [sys.executable, "-m", "launcher", "validate", str(recipe(data, tmp_path))],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert "needs the package 'datasets', which is not installed: pip install -e '.[hf]'" in proc.stderr
