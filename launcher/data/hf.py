"""Datasets over `datasets.load_dataset` with a Hugging Face tokenizer: text packed into blocks for causal language
modelling (`hf_text`), and labelled text, truncated and padded, for sequence classification
(`hf_classification`).

The data is a local `json`/`jsonl`/`csv`/`parquet`/`text` file (`{split}` in its path names one file per split), or
a Hub dataset where the machine reaches the Hub. It is tokenized once and cached (`cache_dir`, by default under
the `datasets` cache) in plain numpy files, keyed by the file, the tokenizer and the arguments that change the
tokens. The first process to need it builds it under a file lock; every other one (any rank, any later run) waits
for it and maps the same files. The samples are then a map-style set like the built-in ones, so a resumed run
continues at the same sample, on any number of processes.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from filelock import FileLock
from torch.utils.data import Dataset

from launcher import hub
from launcher.components import ArgumentProblem, describe, fraction_problem, integer_problem, optional
from launcher.data import DataFacts
from launcher.data.records import Unreadable, check_columns, empty, first_columns, reason
from launcher.data.tokenizing import BYTES, fingerprint, load_tokenizer, tokenizer_path_problem

FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text", ".text": "text"}
CACHE_VERSION = 1  # bumped when the cached files' meaning changes, so older caches are not read


def hf_datasets() -> Any:
    return optional("datasets", "hf")


def source(path: str, split: str) -> tuple[str, Path | None]:
    """The path with `{split}` filled in, and the local file it names (None: a Hub dataset's name)."""
    name = path.replace("{split}", split)
    file = Path(name).expanduser()
    if file.is_file():
        return name, file
    if os.path.exists(name) or name.startswith(("/", ".", "~")) or Path(name).suffix in FORMATS:
        raise ArgumentProblem("path", f"file not found: {file} (relative paths start at {Path.cwd()})")
    return name, None


def builder_of(file: Path | None, format: str | None) -> str | None:
    """The `datasets` builder that reads the file (None: a Hub dataset's own)."""
    builder = format or (FORMATS.get(file.suffix.lower()) if file is not None else None)
    if file is not None and builder is None:
        raise ArgumentProblem(
            "format", f"cannot tell the format of {file}: give one of {', '.join(sorted(set(FORMATS.values())))}"
        )
    return builder


def arrow_cache(cache_dir: str | None) -> str | None:
    """Where `datasets` keeps its Arrow copy of the records: beside the tokens, under the recipe's `cache_dir`
    (None: `datasets`' own cache, HF_DATASETS_CACHE, by default ~/.cache/huggingface/datasets)."""
    return str(Path(cache_dir).expanduser() / "datasets") if cache_dir else None


def load_records(
    name: str, file: Path | None, format: str | None, columns: tuple[str, ...], cache_dir: str | None = None
) -> Any:
    """The file's records as a `datasets.Dataset` (its Arrow copy under `cache_dir`, see `arrow_cache`); a file
    without records, or without a column, is refused, naming the columns it has."""
    datasets = hf_datasets()
    builder = builder_of(file, format)
    if file is not None and file.stat().st_size == 0:
        raise empty(file)
    options = {"keep_linebreaks": True} if builder == "text" else {}
    if file is None:
        hub.require(name, "path", "dataset")
    try:
        if file is None:
            records = datasets.load_dataset(name, split="train", cache_dir=arrow_cache(cache_dir))
        else:
            records = datasets.load_dataset(
                builder, data_files=str(file), split="train", cache_dir=arrow_cache(cache_dir), **options
            )
    except Exception as e:  # the Hub unreachable, a file that does not parse as its format
        if file is not None and "corresponds to no data" in str(e):  # a CSV header without records
            raise empty(file) from None
        as_builder = f" as {builder}" if file is not None else ""
        raise ArgumentProblem("path", f"cannot load {name!r}{as_builder}: {reason(e)}") from None
    if len(records) == 0:
        raise empty(name)
    check_columns(name, records.column_names, columns)
    return records


def peek_file(path: str, split: str, format: str | None, columns: tuple[str, ...]) -> None:
    """The split's file read from its start only (its format, that it holds a record, its columns), as
    `launcher validate` checks it: nothing is loaded whole, tokenized or written. Of a Hub dataset, only whether the
    Hub (or the cache, offline) has it here."""
    hf_datasets()  # needed to train: asked for here too, so validate names the missing extra
    name, file = source(path, split)
    builder = builder_of(file, format)
    if file is None:
        hub.require(name, "path", "dataset")  # whether it can be loaded here; its records are read by training
    if file is None or builder is None:
        return
    try:
        have = first_columns(file, builder)
    except Unreadable as e:
        raise ArgumentProblem("path", f"cannot load {name!r} as {builder}: {e}") from None
    if have is None:
        raise empty(file)
    check_columns(name, have, columns)


def cached(cache_dir: str | None, key: Mapping[str, Any], make: Callable[[], dict[str, np.ndarray]]) -> dict[str, Any]:
    """The arrays `make` returns, built once per `key` into `cache_dir` under a file lock, then memory-mapped."""
    root = Path(cache_dir).expanduser() if cache_dir else Path(hf_datasets().config.HF_DATASETS_CACHE) / "launcher"
    digest = hashlib.sha256(json.dumps({**key, "version": CACHE_VERSION}, sort_keys=True).encode()).hexdigest()[:24]
    folder = root / digest
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f"{digest}.lock")):
        if not (folder / "done").is_file():
            folder.mkdir(exist_ok=True)
            for name, array in make().items():
                np.save(folder / f"{name}.tmp.npy", array)
                (folder / f"{name}.tmp.npy").replace(folder / f"{name}.npy")
            (folder / "done").write_text(json.dumps(key, sort_keys=True))
    return {f.stem: np.load(f, mmap_mode="r") for f in folder.glob("*.npy") if not f.stem.endswith(".tmp")}


def file_key(name: str, file: Path | None) -> dict[str, Any]:
    if file is None:
        return {"hub": name}
    stat = file.stat()
    return {"file": str(file.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def split_range(count: int, split: str, val_fraction: float, own_file: bool) -> range:
    """The items of `split`: all of a split's own file, else the last `val_fraction` of them for val."""
    if own_file:
        return range(count)
    cut = count - max(int(count * val_fraction), 1)
    return range(cut) if split == "train" else range(cut, count)


def opened(path: str, tokenizer: str, split: str, kind: str) -> tuple[Any, str, Path | None, dict[str, Any]]:
    """The tokenizer, the split's source (its name, and its local file), and the cache key they make."""
    hf_datasets()  # needed to build the cache, and asked for even where it is built already: one rule
    loaded = load_tokenizer(tokenizer)
    name, file = source(path, split)
    return loaded, name, file, {"kind": kind, **file_key(name, file), "tokenizer": fingerprint(loaded)}


def told(tokenizer: Any, length: int) -> dict[str, Any]:
    """What a tokenized set tells the model: its vocabulary, sequence length and special tokens' ids. A tokenizer
    without a beginning-of-text token begins with its end-of-text one, as GPT-2's does."""
    eos, bos = tokenizer.eos_token_id, tokenizer.bos_token_id
    return {
        "vocab_size": len(tokenizer),
        "block_size": length,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": eos if bos is None else bos,
        "eos_token_id": eos,
    }


def missing_files(args: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(argument, problem) pairs for the local files and folders the arguments name that are not there, told
    before `transformers` and `datasets` are imported (a Hub name is left to loading)."""
    problems = []
    try:
        source(args["path"], args["split"])
    except ArgumentProblem as e:
        problems.append((e.arg, e.message))
    problem = None if args["tokenizer"] == BYTES else tokenizer_path_problem(args["tokenizer"])
    return problems + ([("tokenizer", problem)] if problem else [])


class StreamsWhenAsked:
    """A set whose train split, with `streaming: true`, is read as it goes: built as `streamed` (a dotted path, see
    launcher/data/streaming.py) instead. The val split stays map-style: evaluations count each sample once."""

    streamed = ""

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("streaming") is True and kwargs.get("split", "train") == "train":
            from launcher.components import import_object

            return import_object(cls.streamed)(*args, **kwargs)
        return super().__new__(cls)


class HFText(StreamsWhenAsked, Dataset):
    """Records of text tokenized (no special tokens but an end-of-text token between records), concatenated and cut
    into `block_size` token blocks; the labels are the inputs (the model shifts them). The last `val_fraction` of
    the blocks are val, unless the path has `{split}` (one file per split). `streaming: true` reads the train split
    as it goes instead (launcher/data/streaming.py; `shuffle_buffer`: the blocks it shuffles among)."""

    streamed = "launcher.data.streaming.StreamedText"

    def __init__(
        self,
        path: str,
        tokenizer: str,
        split: str = "train",
        block_size: int = 512,
        column: str = "text",
        val_fraction: float = 0.05,
        format: str | None = None,
        cache_dir: str | None = None,
        streaming: bool = False,
        shuffle_buffer: int = 1000,
    ):
        self.tokenizer, name, file, key = opened(path, tokenizer, split, "text")
        key["column"] = column
        arrays = cached(cache_dir, key, lambda: {"tokens": self._tokenize(name, file, format, column, cache_dir)})
        self.tokens = arrays["tokens"]
        self.block_size = block_size
        blocks = len(self.tokens) // block_size
        self.items = split_range(blocks, split, val_fraction, "{split}" in path)
        if len(self.items) == 0:
            raise ArgumentProblem(
                "block_size", f"{name} has {len(self.tokens):,} tokens: no {split} block of {block_size}"
            )
        self.model_kwargs = told(self.tokenizer, block_size)

    def _tokenize(
        self, name: str, file: Path | None, format: str | None, column: str, cache_dir: str | None
    ) -> np.ndarray:
        records = load_records(name, file, format, (column,), cache_dir)
        lines = (format or FORMATS.get(file.suffix.lower() if file else "", "")) == "text"
        eos = [] if lines or self.tokenizer.eos_token_id is None else [self.tokenizer.eos_token_id]
        encode = self.tokenizer

        def tokenize(batch: dict[str, list[Any]]) -> dict[str, list[list[int]]]:
            ids = encode([str(t) for t in batch[column]], add_special_tokens=False)["input_ids"]
            return {"ids": [x + eos for x in ids]}

        tokenized = records.map(tokenize, batched=True, remove_columns=records.column_names)
        dtype = np.uint32 if len(self.tokenizer) >= 2**16 else np.uint16
        return np.fromiter((t for ids in tokenized["ids"] for t in ids), dtype=dtype)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        start = self.items[i] * self.block_size
        ids = torch.from_numpy(self.tokens[start : start + self.block_size].astype(np.int64))
        return {"input_ids": ids, "labels": ids.clone()}

    @staticmethod
    def check_args(args: Mapping[str, Any]) -> list[tuple[str, str]]:
        streamed = [(name, problem) for name, problem in stream_problems(args) if problem]
        return common_problems(args, "block_size") + streamed

    @staticmethod
    def peek(args: Mapping[str, Any], tell: bool = True) -> DataFacts:
        """What is known without building the set: its file read from the start (`peek_file`) and, with `tell`,
        what the tokenizer tells the model; its samples are counted only once it is tokenized."""
        peek_file(args["path"], args["split"], args["format"], (args["column"],))
        if not tell:
            return DataFacts(samples=None)
        return DataFacts(model_kwargs=told(load_tokenizer(args["tokenizer"]), args["block_size"]), samples=None)

    missing_files = staticmethod(missing_files)


class HFClassification(Dataset):
    """Labelled text: each record's text tokenized, truncated and padded to `max_length`, with its label's index.
    Labels may be integers or names; names are numbered in sorted order over the whole file (or as `labels` lists
    them), so every split numbers them alike."""

    def __init__(
        self,
        path: str,
        tokenizer: str,
        split: str = "train",
        max_length: int = 128,
        column: str = "text",
        label_column: str = "label",
        labels: list[str] | None = None,
        val_fraction: float = 0.1,
        format: str | None = None,
        cache_dir: str | None = None,
    ):
        self.tokenizer, name, file, key = opened(path, tokenizer, split, "classification")
        key.update(columns=[column, label_column], max_length=max_length, labels=labels)
        arrays = cached(
            cache_dir,
            key,
            lambda: self._tokenize(name, file, format, (column, label_column), labels, max_length, cache_dir),
        )
        self.arrays = arrays
        self.names = [str(n) for n in json.loads(bytes(arrays["names"]).decode())]
        self.items = split_range(len(arrays["labels"]), split, val_fraction, "{split}" in path)
        self.model_kwargs = {**told(self.tokenizer, max_length), "num_labels": len(self.names), "labels": self.names}

    def _tokenize(
        self,
        name: str,
        file: Path | None,
        format: str | None,
        columns: tuple[str, str],
        labels: list[str] | None,
        max_length: int,
        cache_dir: str | None,
    ) -> dict[str, np.ndarray]:
        column, label_column = columns
        records = load_records(name, file, format, columns, cache_dir)
        values = records[label_column]
        names = [str(n) for n in labels] if labels else sorted({str(v) for v in values}, key=natural)
        index = {n: i for i, n in enumerate(names)}
        unknown = sorted({str(v) for v in values} - set(index))
        if unknown:
            raise ArgumentProblem("labels", f"{name} has labels not in the list: {', '.join(unknown[:5])}")
        encoded = self.tokenizer(
            [str(t) for t in records[column]], truncation=True, max_length=max_length, padding="max_length"
        )
        return {
            "input_ids": np.asarray(encoded["input_ids"], dtype=np.int32),
            "attention_mask": np.asarray(encoded["attention_mask"], dtype=np.int8),
            "labels": np.asarray([index[str(v)] for v in values], dtype=np.int64),
            "names": np.frombuffer(json.dumps(names).encode(), dtype=np.uint8),
        }

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        j = self.items[i]
        return {
            "input_ids": torch.from_numpy(self.arrays["input_ids"][j].astype(np.int64)),
            "attention_mask": torch.from_numpy(self.arrays["attention_mask"][j].astype(np.int64)),
            "labels": torch.tensor(int(self.arrays["labels"][j])),
        }

    @staticmethod
    def check_args(args: Mapping[str, Any]) -> list[tuple[str, str]]:
        return common_problems(args, "max_length")

    @staticmethod
    def peek(args: Mapping[str, Any], tell: bool = True) -> DataFacts:
        """As `HFText.peek`; the labels are known only where `labels` lists them (else the whole file tells)."""
        peek_file(args["path"], args["split"], args["format"], (args["column"], args["label_column"]))
        if not tell:
            return DataFacts(samples=None)
        told_model = told(load_tokenizer(args["tokenizer"]), args["max_length"])
        if args["labels"]:
            told_model.update(num_labels=len(args["labels"]), labels=[str(n) for n in args["labels"]])
        return DataFacts(model_kwargs=told_model, samples=None)

    missing_files = staticmethod(missing_files)


def natural(name: str) -> tuple[int, Any]:
    """Integers in numeric order before names in text order."""
    return (0, int(name)) if name.lstrip("-").isdigit() else (1, name)


REQUIRED = {"path": "a data file, or a Hub dataset's name", "tokenizer": "a tokenizer's folder, or bytes"}


def common_problems(args: Mapping[str, Any], length: str) -> list[tuple[str, str]]:
    checks = [
        (length, integer_problem(args.get(length), 2)),
        ("val_fraction", fraction_problem(args.get("val_fraction"), zero=False)),
    ]
    for name, what in REQUIRED.items():
        if args.get(name) is None:
            checks.append((name, f"missing required value ({what})"))
        elif not isinstance(args.get(name), str):
            checks.append((name, f"expected a string ({what}), got {describe(args.get(name))}"))
    if args.get("split") not in ("train", "val"):
        checks.append(("split", f"expected one of: train, val; got {describe(args.get('split'))}"))
    fmt = args.get("format")
    if fmt is not None and fmt not in set(FORMATS.values()):
        checks.append(("format", f"expected one of: {', '.join(sorted(set(FORMATS.values())))}; got {describe(fmt)}"))
    return [(name, problem) for name, problem in checks if problem]


def stream_problems(args: Mapping[str, Any]) -> list[tuple[str, str | None]]:
    """(argument, problem) pairs of `streaming` and `shuffle_buffer`, as `hf_text`'s `check_args` gives them."""
    streaming = args.get("streaming")
    problems: list[tuple[str, str | None]] = [
        ("streaming", None if isinstance(streaming, bool) else f"expected true or false, got {streaming!r}"),
        ("shuffle_buffer", integer_problem(args.get("shuffle_buffer"), 0)),
    ]
    if streaming is True and args.get("split") == "val" and "{split}" not in str(args.get("path")):
        problems.append(
            (
                "streaming",
                "a streamed train set has no held-out tail to validate on: give a path with {split} (one file per "
                "split; the val split is read map-style) or set data.val: null",
            )
        )
    return problems
