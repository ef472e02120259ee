"""Conversations for instruction fine-tuning of a causal LM (`hf_chat`): each record is a list of messages (a
`messages` column of {role, content}, roles system/user/assistant, any number of turns) or a prompt and a response
(`prompt_column`, `response_column`: a user turn, then the assistant's), rendered through the tokenizer's chat
template. The labels count exactly the assistant's answers: each answer's tokens and what the template writes to
close that turn (its end-of-turn token, and a newline after it where the template writes one), so the model learns
to stop; every other label is -100.

Examples longer than `max_length` tokens are dropped (`too_long: drop`, counted in one line) or cut to their first
`max_length` tokens (`truncate`; one left with no answer token is dropped). With `packing` the examples of a split
are laid one after another into rows of `max_length` tokens, a row taking the next example while it fits (an
example is never split across rows), the row's end padded with labels -100; `position_ids` restart at 0 with each
example, and no `attention_mask` is given, from which `transformers` builds a block-diagonal causal mask (eager,
sdpa and flex attention; flash attention reads the same `position_ids` as sequence boundaries): no token attends to
another example. Without packing each example is a row of its own, padded, with its `attention_mask`.

Tokenized once into the same numpy cache as `hf_text` (data/hf.py); the rows are laid out when the set opens, so
packed and padded runs share one cache.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from launcher.batches import IGNORE_INDEX
from launcher.components import ArgumentProblem, describe
from launcher.data import DataFacts
from launcher.data.hf import (
    builder_of,
    cached,
    common_problems,
    hf_datasets,
    load_records,
    missing_files,
    opened,
    source,
    split_range,
    told,
)
from launcher.data.records import empty, reason
from launcher.data.tokenizing import BYTES, load_tokenizer

ROLES = ("system", "user", "assistant")
TOO_LONG = ("drop", "truncate")
# The built-in `bytes` tokenizer has no template of its own: this one, so that a chat recipe runs out of the box.
# Each turn is `<|role|>`, a newline, the content, then the end-of-text token (the end of turn) and a newline.
BYTES_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


class HFChat(Dataset):
    """Conversations rendered by the chat template, the loss counting the assistant's answers (see the module)."""

    def __init__(
        self,
        path: str,
        tokenizer: str,
        split: str = "train",
        max_length: int = 512,
        packing: bool = True,
        messages_column: str = "messages",
        prompt_column: str | None = None,
        response_column: str | None = None,
        chat_template: str | None = None,
        too_long: str = "drop",
        val_fraction: float = 0.05,
        format: str | None = None,
        cache_dir: str | None = None,
    ):
        self.tokenizer, name, file, key = opened(path, tokenizer, split, "chat")
        use_template(self.tokenizer, tokenizer, chat_template)
        columns = (prompt_column, response_column) if prompt_column else (messages_column,)
        key.update(template=self.tokenizer.chat_template, columns=list(columns), max_length=max_length)
        key["too_long"] = too_long
        shown = str(file) if file is not None else name

        def make() -> dict[str, np.ndarray]:
            records = load_records(name, file, format, ())
            return encode_records(self.tokenizer, shown, records, columns, max_length, too_long == "truncate")

        self.arrays = cached(cache_dir, key, make)
        offsets = np.asarray(self.arrays["offsets"], dtype=np.int64)
        lengths = np.diff(offsets)
        examples = split_range(len(lengths), split, val_fraction, "{split}" in path)
        if len(examples) == 0:
            raise ArgumentProblem("path", f"{shown} has no {split} example of at most {max_length} tokens")
        dropped = int(self.arrays["dropped"][0])
        if dropped and split == "train":
            how = "cut to" if too_long == "truncate" else "longer than"
            left = ", no answer token left" if too_long == "truncate" else ""
            note(
                f"note: {shown}: {dropped} of {dropped + len(lengths)} examples dropped ({how} max_length {max_length} "
                f"tokens{left})"
            )
        self.starts = offsets[examples.start : examples.stop]
        self.lengths = lengths[examples.start : examples.stop]
        count = len(self.lengths)
        self.rows = pack(self.lengths.tolist(), max_length) if packing else [range(i, i + 1) for i in range(count)]
        self.max_length, self.packing = max_length, packing
        self.pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.model_kwargs = {**told(self.tokenizer, max_length), **({"packed": True} if packing else {})}

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids, labels, positions = [], [], []
        for j in self.rows[i]:
            start, length = int(self.starts[j]), int(self.lengths[j])
            tokens = np.asarray(self.arrays["ids"][start : start + length], dtype=np.int64)
            counted = np.asarray(self.arrays["counted"][start : start + length], dtype=bool)
            ids.append(tokens)
            labels.append(np.where(counted, tokens, IGNORE_INDEX))
            positions.append(np.arange(length))
        used = sum(len(t) for t in ids)
        pad = self.max_length - used
        row = {
            "input_ids": torch.from_numpy(np.concatenate([*ids, np.full(pad, self.pad)])),
            "labels": torch.from_numpy(np.concatenate([*labels, np.full(pad, IGNORE_INDEX)])),
        }
        if self.packing:
            # The padding is a segment of its own: no real token attends to it, nor it to them.
            row["position_ids"] = torch.from_numpy(np.concatenate([*positions, np.arange(pad)]))
        else:
            row["attention_mask"] = (torch.arange(self.max_length) < used).long()
        return row

    @staticmethod
    def peek(args: Mapping[str, Any], tell: bool = True) -> DataFacts:
        """What `launcher validate` checks without tokenizing or writing anything: the tokenizer and its chat
        template, and every record's conversation (its roles and texts, not yet rendered), read as the file streams
        (`load_dataset(..., streaming=True)` keeps no copy). A Hub dataset is read by training only."""
        tokenizer = load_tokenizer(args["tokenizer"])
        use_template(tokenizer, args["tokenizer"], args["chat_template"])
        file = source(args["path"], args["split"])[1]
        builder = builder_of(file, args["format"])
        if file is not None and builder is not None:
            columns = (args["prompt_column"], args["response_column"]) if args["prompt_column"] else None
            check_conversations(hf_datasets(), file, builder, columns or (args["messages_column"],))
        if not tell:
            return DataFacts(samples=None)
        packed = {"packed": True} if args["packing"] else {}
        return DataFacts(model_kwargs={**told(tokenizer, args["max_length"]), **packed}, samples=None)

    missing_files = staticmethod(missing_files)

    @staticmethod
    def check_args(args: Mapping[str, Any]) -> list[tuple[str, str]]:
        problems = common_problems(args, "max_length")
        if not isinstance(args.get("packing"), bool):
            problems.append(("packing", f"expected true or false, got {describe(args.get('packing'))}"))
        if args.get("too_long") not in TOO_LONG:
            problems.append(
                ("too_long", f"expected one of: {', '.join(TOO_LONG)}; got {describe(args.get('too_long'))}")
            )
        if (args.get("prompt_column") is None) != (args.get("response_column") is None):
            given, other = ("prompt_column", "response_column")[:: 1 if args.get("prompt_column") else -1]
            problems.append((given, f"given without {other}: give both, or neither (a messages_column)"))
        return problems


NOTED: set[str] = set()  # what this process said already: the recipe's checks open the set before training does


def note(line: str) -> None:
    """Say `line` once per run, on the first process."""
    if line not in NOTED and os.environ.get("RANK", "0") == "0":
        print(line, file=sys.stderr)
    NOTED.add(line)


def use_template(tokenizer: Any, name: str, template: str | None) -> None:
    """Give the tokenizer the recipe's template, or the built-in one for `bytes`; refuse one with none."""
    if template is not None:
        file = Path(template).expanduser()
        tokenizer.chat_template = file.read_text() if "{" not in template and file.is_file() else template
    elif name == BYTES and not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = BYTES_TEMPLATE
    if not getattr(tokenizer, "chat_template", None):
        raise ArgumentProblem(
            "tokenizer",
            f"{name} has no chat template: use a chat model's tokenizer, or give chat_template (a Jinja template "
            "or a file holding one)",
        )


def check_conversations(datasets: Any, file: Path, builder: str, columns: Sequence[str]) -> None:
    """Every record of the file read as a conversation (`conversation`), as `encode_records` will."""
    row = 0
    # Streaming keeps no copy of the records; its lock files go to a folder of its own, removed after.
    with tempfile.TemporaryDirectory(prefix="launcher-validate-") as scratch:
        records = datasets.load_dataset(builder, data_files=str(file), split="train", streaming=True, cache_dir=scratch)
        try:
            for row, record in enumerate(records, start=1):
                if row == 1:
                    missing_column(file, columns, list(record))
                conversation([record[c] for c in columns], str(file), row)
        except ArgumentProblem:
            raise
        except Exception as e:  # a record that does not parse as its format
            raise ArgumentProblem("path", f"cannot load {str(file)!r} as {builder}: {reason(e)}") from None
    if row == 0:
        raise empty(file)


def missing_column(shown: Path | str, columns: Sequence[str], have: list[str]) -> None:
    missing = [c for c in columns if c not in have]
    if missing:
        # Under `path`, which both splits share: the file is what lacks it, whether the column was named or not.
        raise ArgumentProblem(
            "path",
            f"{shown} has no column {missing[0]!r} (its columns: {', '.join(have)}): name its conversations' column "
            "with messages_column, or give prompt_column and response_column",
        )


def encode_records(
    tokenizer: Any, shown: str, records: Any, columns: Sequence[str], max_length: int, truncate: bool
) -> dict[str, np.ndarray]:
    """Every record's tokens and which of them count, concatenated, with each example's offset; examples too long
    (or, truncated, with no answer left) are dropped and counted."""
    missing_column(shown, columns, records.column_names)
    ids: list[int] = []
    counted: list[bool] = []
    offsets, dropped = [0], 0
    values = [records[c] for c in columns]
    for row, fields in enumerate(zip(*values, strict=True), start=1):
        messages = conversation(fields, shown, row)
        tokens, mask = encode(tokenizer, messages, shown, row)
        if truncate:
            tokens, mask = tokens[:max_length], mask[:max_length]
        if len(tokens) > max_length or not any(mask):
            dropped += 1
            continue
        ids += tokens
        counted += mask
        offsets.append(len(ids))
    dtype = np.uint32 if len(tokenizer) >= 2**16 else np.uint16
    return {
        "ids": np.asarray(ids, dtype=dtype),
        "counted": np.asarray(counted, dtype=np.uint8),
        "offsets": np.asarray(offsets, dtype=np.int64),
        "dropped": np.asarray([dropped], dtype=np.int64),
    }


def conversation(fields: Sequence[Any], shown: str, row: int) -> list[dict[str, str]]:
    """A record's messages, checked: each a {role, content} of strings, a known role, at least one answer."""
    if len(fields) == 2:
        prompt, response = fields
        if not isinstance(prompt, str) or not isinstance(response, str):
            raise ArgumentProblem("path", f"{shown} row {row}: the prompt and the response must be text")
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    messages = fields[0]
    if not isinstance(messages, list) or not messages:
        raise ArgumentProblem("path", f"{shown} row {row}: messages must be a non-empty list, got {describe(messages)}")
    for i, m in enumerate(messages):
        missing = [k for k in ("role", "content") if not isinstance(m, Mapping) or not isinstance(m.get(k), str)]
        if missing:
            raise ArgumentProblem("path", f"{shown} row {row}: messages[{i}] has no {' or '.join(missing)} (text)")
        if m["role"] not in ROLES:
            raise ArgumentProblem(
                "path", f"{shown} row {row}: messages[{i}] has role {m['role']!r}; expected one of: {', '.join(ROLES)}"
            )
    if not any(m["role"] == "assistant" for m in messages):
        raise ArgumentProblem("path", f"{shown} row {row}: no assistant message, so nothing to learn")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def render(tokenizer: Any, messages: list[dict[str, str]], prompt: bool, shown: str, row: int) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
    except Exception as e:  # the template's own refusal (roles that must alternate, a system turn it lacks)
        raise ArgumentProblem("path", f"{shown} row {row}: the chat template refuses it: {e}") from None


def encode(tokenizer: Any, messages: list[dict[str, str]], shown: str, row: int) -> tuple[list[int], list[bool]]:
    """The conversation's tokens, and which are answer tokens.

    Each answer's span is found by rendering the conversation up to it (with the generation prompt: everything
    before the answer) and through it: the characters between the two are the answer and its end of turn. This
    works with any template that renders earlier turns the same whatever follows, which most shipped ones do,
    where `return_assistant_tokens_mask` needs `{% generation %}` marks that most lack (Llama 3's, Qwen's). Spans
    are in characters, and a token counts where it overlaps one, so a token merging across the boundary is no
    trouble; a template that renders an earlier turn otherwise once more follows is refused for that row."""
    text = render(tokenizer, messages, False, shown, row)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:i], True, shown, row)
        through = render(tokenizer, messages[: i + 1], False, shown, row)
        if not (text.startswith(before) and text.startswith(through) and len(through) > len(before)):
            raise ArgumentProblem(
                "path",
                f"{shown} row {row}: the chat template renders messages[{i}]'s context differently once the "
                "conversation goes on, so its answer cannot be found",
            )
        spans.append((len(before), len(through)))
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [any(s < b and e > a for a, b in spans) for s, e in encoded["offset_mapping"]]
    return list(encoded["input_ids"]), mask


def pack(lengths: Sequence[int], max_length: int) -> list[range]:
    """Rows of consecutive examples (by index), each taking the next example while the row has room for it."""
    rows: list[range] = []
    start, used = 0, 0
    for i, length in enumerate(lengths):
        if used + length > max_length and i > start:
            rows.append(range(start, i))
            start, used = i, 0
        used += length
    if len(lengths) > start:
        rows.append(range(start, len(lengths)))
    return rows
