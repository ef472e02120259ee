"""Instruction fine-tuning data (`hf_chat`): the loss counts exactly the assistant's answers, found here from the
chat template alone; a packed row's examples do not attend to each other; val/loss weighs every answer token
alike; bad conversations are refused in one line, exit 2, by validate and train alike; and a short run logs
val/perplexity, which early stopping and the best checkpoint watch. The tokenizer is test_hf's, given a template."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import REPO, read_metrics, run_cli
from test_hf import LLAMA, data  # noqa: F401 (a fixture)
from test_refusals import launcher

pytest.importorskip("transformers")

TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
LONG = LLAMA.replace("max_position_embeddings: 64", "max_position_embeddings: 256")  # room for a conversation
SAMPLE = REPO / "recipes" / "data" / "chat_sample.jsonl"
CHAT = """\
model: {_component_: hf_causal_lm, config: LLAMA}
data:
  dataset: {_component_: hf_chat, path: CHATS, tokenizer: TOKENIZER, max_length: 256, val_fraction: 0.1,
            cache_dir: CACHE}
optimizer: {_component_: adamw, lr: 0.003}
train: {max_steps: 8, batch_size: 4, seed: 5}
eval: {every_steps: 4, every_epoch: false, max_batches: 2}
early_stopping: {monitor: val/perplexity, patience: 5}
checkpoint: {every_steps: 4, keep_last: 1, keep_best: 1, monitor: val/perplexity}
logging: {every_steps: 1, trackers: [jsonl], progress_bar: false}
"""
TURNS = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Two plus two?"},
    {"role": "assistant", "content": "Four."},
    {"role": "user", "content": "Thy name?"},
    {"role": "assistant", "content": "Richard, my lord."},
]


@pytest.fixture(scope="module")
def chat(data: Path) -> Path:  # noqa: F811
    """test_hf's tokenizer saved with a chat template (and without), and a few conversations."""
    from transformers import AutoTokenizer

    out = data / "chat"
    tokenizer = AutoTokenizer.from_pretrained(data / "tokenizer")
    tokenizer.save_pretrained(out / "plain")
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(out / "tokenizer")
    rows = [TURNS, TURNS[1:3], [TURNS[3], {"role": "assistant", "content": "Richard."}]] * 4
    (out / "few.jsonl").write_text("".join(json.dumps({"messages": m}) + "\n" for m in rows))
    return out


def tiny_model(vocab: int, attn: str = "sdpa") -> torch.nn.Module:
    """The launcher's model as a recipe builds it (no key-value cache, which would hide packing from the mask)."""
    import yaml

    from launcher.models.hf import causal_lm

    torch.manual_seed(0)
    config = yaml.safe_load(LONG) | {"attention_dropout": 0.0}
    return causal_lm(config=config, attn_implementation=attn, vocab_size=vocab, packed=True).eval()


def test_the_loss_counts_exactly_the_answer_tokens_and_val_loss_weighs_each_alike(chat: Path):
    from accelerate import Accelerator
    from transformers import AutoTokenizer

    from launcher import batches
    from launcher.data.chat import HFChat
    from launcher.evaluation import evaluate
    from launcher.precision import Precision

    tokenizer = AutoTokenizer.from_pretrained(chat / "tokenizer")
    ids = tokenizer.apply_chat_template(TURNS, tokenize=True)["input_ids"]
    # The answers, from the template alone: between the prompt up to each answer and the conversation through it.
    answers = []
    for i in (2, 4):
        before = tokenizer.apply_chat_template(TURNS[:i], tokenize=True, add_generation_prompt=True)["input_ids"]
        through = tokenizer.apply_chat_template(TURNS[: i + 1], tokenize=True)["input_ids"]
        assert ids[: len(through)] == through and through[: len(before)] == before
        answers += range(len(before), len(through))
    model = tiny_model(len(tokenizer))
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
        by_hand = torch.nn.functional.cross_entropy(logits[[p - 1 for p in answers]], torch.tensor(ids)[answers])

        rows = HFChat(str(chat / "few.jsonl"), str(chat / "tokenizer"), "train", 256, packing=False, val_fraction=0.5)
        row = {k: v[None] for k, v in rows[0].items()}
        assert row["input_ids"][0, : len(ids)].tolist() == ids
        assert (row["labels"][0] != -100).nonzero().flatten().tolist() == answers
        launchers = batches.micro_batch_loss(model, None, row, row["labels"])
        assert abs(launchers.item() - by_hand.item()) < 1e-5

        # val/loss over two examples of 14 and 3 answer tokens: each token weighs alike, not each example.
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(rows, [0, 2]), batch_size=1)
        per_token = []
        for batch in loader:
            out = model(**batch).logits[0, :-1]
            per_token.append(torch.nn.functional.cross_entropy(out, batch["labels"][0, 1:], reduction="none"))
        counted = torch.cat(per_token)[torch.cat([b["labels"][0, 1:] for b in loader]) != -100]
        logged = evaluate(Accelerator(cpu=True), model, loader, None, None, Precision(), False)
    assert abs(logged["val/loss"] - counted.mean().item()) < 1e-5
    assert math.isclose(logged["val/perplexity"], math.exp(counted.mean().item()), rel_tol=1e-5)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_a_packed_rows_examples_do_not_attend_to_each_other(chat: Path, attn: str):
    from launcher.data.chat import HFChat

    packed = HFChat(str(chat / "few.jsonl"), str(chat / "tokenizer"), "train", 256, packing=True, val_fraction=0.5)
    row = packed[0]
    starts = (row["position_ids"] == 0).nonzero().flatten().tolist()
    assert len(starts) >= 3  # two examples and the padding
    second = slice(starts[1], starts[2])
    model = tiny_model(len(packed.tokenizer), attn)
    with torch.no_grad():
        together = model(input_ids=row["input_ids"][None], position_ids=row["position_ids"][None]).logits[0, second]
        alone = model(input_ids=row["input_ids"][None, second]).logits[0]
        crossing = model(input_ids=row["input_ids"][None]).logits[0, second]  # one causal mask over the row
    assert (together - alone).abs().max() < 1e-5
    assert (crossing - alone).abs().max() > 1e-3  # what the test would see if attention crossed


GOOD = {"messages": TURNS[1:3]}
REFUSALS = {  # (the file's rows, overrides, the line)
    "no template": ([GOOD], ["data.dataset.tokenizer=PLAIN"], "data.dataset.tokenizer: PLAIN has no chat template"),
    "no answer": ([GOOD, {"messages": TURNS[:2]}], [], "data.dataset.path: CHATS row 2: no assistant message"),
    "role": (
        [{"messages": [{"role": "bot", "content": "hi"}]}],
        [],
        "CHATS row 1: messages[0] has role 'bot'; expected one of: system, user, assistant",
    ),
    "content": (
        [GOOD, GOOD, {"messages": [TURNS[1], {"role": "assistant"}]}],
        [],
        "CHATS row 3: messages[1] has no content",
    ),
    "column": ([{"text": "hi"}], [], "data.dataset.path: CHATS has no column 'messages' (its columns: text)"),
    "half": ([GOOD], ["data.dataset.prompt_column=q"], "data.dataset.prompt_column: given without response_column"),
}


def chat_recipe(folder: Path, chats: Path, chat: Path, cache: Path) -> Path:
    """`CHAT` on the file `chats`, with the tokenizer the `chat` fixture made, written in `folder`."""
    path = folder / "chat.yaml"
    path.write_text(
        CHAT.replace("LLAMA", LONG)
        .replace("CHATS", str(chats))
        .replace("TOKENIZER", str(chat / "tokenizer"))
        .replace("CACHE", str(cache))
    )
    return path


@pytest.mark.parametrize("case", list(REFUSALS))
def test_bad_conversations_are_refused_in_one_line_by_validate_and_train(chat: Path, tmp_path: Path, case: str):
    rows, overrides, expected = REFUSALS[case]
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = chat_recipe(tmp_path, chats, chat, tmp_path / "cache")
    fill = {"CHATS": str(chats), "PLAIN": str(chat / "plain")}
    for name, value in fill.items():
        expected = expected.replace(name, value)
        overrides = [o.replace(name, value) for o in overrides]
    for command in ("validate", "train"):
        code, err = launcher(command, str(path), f"run_dir={tmp_path / 'run'}", *overrides)
        lines = [line for line in err.splitlines() if line.startswith("error")]
        assert code == 2 and len(lines) == 1 and expected in lines[0], err
    assert not (tmp_path / "run").exists()


def test_instruction_tuning_logs_val_perplexity_which_early_stopping_and_the_best_checkpoint_watch(
    chat: Path, tmp_path: Path
):
    path = chat_recipe(tmp_path, SAMPLE, chat, chat / "cache")
    run_dir = tmp_path / "run"
    proc = run_cli("train", str(path), f"run_dir={run_dir}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = [r for r in read_metrics(run_dir) if "val/perplexity" in r]
    assert [r["step"] for r in rows] == [4, 8]
    assert all(abs(r["val/perplexity"] - math.exp(r["val/loss"])) < 1e-6 * r["val/perplexity"] for r in rows)
    assert rows[1]["val/perplexity"] < rows[0]["val/perplexity"]
    best = json.loads((run_dir / "checkpoints" / "step_00000008" / "trainer_state.json").read_text())
    assert best["best_checkpoints"][0][0] == 8
