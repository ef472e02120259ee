"""Streamed data: records read as they go (`datasets.load_dataset(..., streaming=True)`: no download of the whole
set, no tokenization up front, no cache), tokenized one record at a time, packed into blocks, shuffled in a buffer,
split across ranks, and resumed exactly.

`TokenStream` is the general piece: a stream of records, a function that tokenizes one, and a block size. A set that
streams (`hf_text` with `streaming: true`: `StreamedText`) gives it its records and its `encode`.

Each rank reads a disjoint share: `datasets.distributed.split_dataset_by_node`, which gives each rank whole shards
(files) where their number divides by the ranks' and otherwise every `world`-th record. It was chosen over a split of
our own because its position is part of the dataset's own `state_dict()`: a resumed rank continues inside its share
without reading the records before it again. The stream never ends: where a rank's share ends, the next pass starts
(each pass shuffled anew), so every rank has a next block as long as the run wants one and no rank waits for another
at the end of its data. A run is therefore bounded by `train.max_steps`.

Exact resumption: the state of a rank's stream is the dataset's position (past the last record read), the tokens
read but not yet cut into a block, the shuffle buffer (blocks read but not yet given out) and its generator, and the
pass. It is taken between two blocks given out, so it is consistent. `datasets`' own shuffle buffer is not resumed
(its buffer is dropped on `load_state_dict`); ours is, at the cost of keeping the buffer's blocks in the checkpoint
(`shuffle_buffer * block_size` token ids per rank). torchdata's `StatefulDataLoader` collects these states from its
workers and accounts for the batches they fetched ahead (`StreamLoader`).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset

from launcher.components import ArgumentProblem, optional
from launcher.data.hf import FORMATS, hf_datasets, source, told
from launcher.data.tokenizing import load_tokenizer

PASS_KEY = "stream_pass"  # the pass a rank's stream is in, as its state holds it (found in workers' states too)


class Packer:
    """Token ids cut into blocks of `block_size`: what is left of a record goes into the next block."""

    def __init__(self, block_size: int):
        self.block_size = block_size
        self.tokens: list[int] = []

    def add(self, tokens: list[int]) -> None:
        self.tokens.extend(tokens)

    def take(self) -> list[int] | None:
        """The next whole block, or None until enough tokens were added."""
        if len(self.tokens) < self.block_size:
            return None
        block, self.tokens = self.tokens[: self.block_size], self.tokens[self.block_size :]
        return block


class Shuffler:
    """A buffer of `size` blocks: each new block takes the place of one drawn at random, which is given out (`size`
    0: in order). The draws come from a generator seeded by the run's seed, the pass and the rank."""

    def __init__(self, size: int):
        self.size = size
        self.buffer: list[list[int]] = []
        self.generator = torch.Generator()

    def seed(self, seed: int, stream_pass: int, rank: int) -> None:
        self.generator.manual_seed(int(np.random.SeedSequence([seed, stream_pass, rank]).generate_state(1)[0]))

    def swap(self, block: list[int]) -> list[int] | None:
        """The block given out in exchange for `block` (None while the buffer fills)."""
        if self.size == 0:
            return block
        if len(self.buffer) < self.size:
            self.buffer.append(block)
            return None
        i = int(torch.randint(self.size, (1,), generator=self.generator))
        out, self.buffer[i] = self.buffer[i], block
        return out

    def drain(self) -> Iterator[list[int]]:
        """What the buffer holds at the end of a pass, in random order, each block removed as it is given out."""
        while self.buffer:
            i = int(torch.randint(len(self.buffer), (1,), generator=self.generator))
            yield self.buffer.pop(i)


class TokenStream(IterableDataset):
    """Blocks of `block_size` token ids (inputs and labels alike, the model shifts them) from `records` (a
    `datasets.IterableDataset`), each record tokenized by `encode`; `share` says which rank reads and how."""

    def __init__(
        self, records: Any, encode: Callable[[Mapping[str, Any]], list[int]], block_size: int, shuffle_buffer: int
    ):
        self.records, self.encode, self.block_size = records, encode, block_size
        self.buffer_size = shuffle_buffer
        self.rank, self.world, self.seed, self.shuffle = 0, 1, 0, False
        self.fresh()

    def share(self, rank: int, world: int, shuffle: bool, seed: int) -> None:
        """Read rank `rank`'s share of `world`, shuffled in the buffer (seeded by `seed` and the pass) or in order."""
        self.rank, self.world, self.shuffle, self.seed = rank, world, shuffle, seed
        self.fresh()

    def fresh(self, stream_pass: int = 0) -> None:
        """Start at the beginning of pass `stream_pass`."""
        self.stream_pass = stream_pass
        self.packer = Packer(self.block_size)
        self.shuffler = Shuffler(self.buffer_size if self.shuffle else 0)
        self.shuffler.seed(self.seed, stream_pass, self.rank)
        self.position: dict[str, Any] | None = None  # the dataset's own state, where a resumed pass continues
        self.current: Any = None  # this pass's records, while they are read

    def pass_records(self) -> Any:
        split_dataset_by_node = optional("datasets.distributed", "hf").split_dataset_by_node
        shared = split_dataset_by_node(self.records, rank=self.rank, world_size=self.world)
        if self.position is not None:
            shared.load_state_dict(self.position)
        return shared

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            self.current = self.pass_records()
            read = False
            for tokens in map(self.encode, self.current):
                read = True
                self.packer.add(tokens)
                while (block := self.packer.take()) is not None:
                    out = self.shuffler.swap(block)
                    if out is not None:
                        yield item(out)
            yield from map(item, self.shuffler.drain())
            if not read and not self.shuffler.buffer and self.position is None:
                return  # nothing in this share (a DataLoader worker given no shard): no pass would give a block
            tokens = self.packer.tokens
            self.fresh(self.stream_pass + 1)
            self.packer.tokens = tokens  # the end of a pass runs on into the next one: no token is dropped

    def state_dict(self) -> dict[str, Any]:
        """Where this rank's stream stands, between two blocks given out: fresh tensors and plain values."""
        position = self.current.state_dict() if self.current is not None else self.position
        return {
            PASS_KEY: self.stream_pass,
            "position": position,
            "tokens": torch.tensor(self.packer.tokens, dtype=torch.int64),
            "buffer": torch.tensor(self.shuffler.buffer, dtype=torch.int64).reshape(-1, self.block_size),
            "generator": self.shuffler.generator.get_state(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.fresh(int(state[PASS_KEY]))
        self.position = state["position"]
        self.packer.tokens = [int(t) for t in state["tokens"]]
        self.shuffler.buffer = [[int(t) for t in row] for row in state["buffer"]]
        self.shuffler.generator.set_state(state["generator"])


def item(block: list[int]) -> dict[str, torch.Tensor]:
    ids = torch.tensor(block, dtype=torch.int64)
    return {"input_ids": ids, "labels": ids.clone()}


def saved_pass(state: Any) -> int | None:
    """The earliest pass any stream in a saved loader state was in (its workers' too); None where none is."""
    if isinstance(state, Mapping):
        found = [int(state[PASS_KEY])] if PASS_KEY in state else []
        found += [p for v in state.values() if (p := saved_pass(v)) is not None]
        return min(found) if found else None
    if isinstance(state, (list, tuple)):
        found = [p for v in state if (p := saved_pass(v)) is not None]
        return min(found) if found else None
    return None


class StreamedText(TokenStream):
    """`hf_text` with `streaming: true`, its train split: the records of a local file (or a Hub dataset) read as
    they go, each tokenized as it comes (an end-of-text token after each, but between lines of a `text` file)."""

    def __init__(
        self,
        path: str,
        tokenizer: str,
        split: str = "train",
        block_size: int = 512,
        column: str = "text",
        format: str | None = None,
        shuffle_buffer: int = 1000,
        **shared: Any,  # the map-style val split's arguments (val_fraction, cache_dir), given to both splits
    ):
        self.tokenizer = load_tokenizer(tokenizer)
        name, file = source(path, split)
        builder = format or (FORMATS.get(file.suffix.lower()) if file is not None else None)
        if file is not None and builder is None:
            raise ArgumentProblem("format", f"cannot tell the format of {file}: give one of {sorted(FORMATS.values())}")
        records = open_stream(name, file, builder, column)
        lines = builder == "text"
        eos = [] if lines or self.tokenizer.eos_token_id is None else [self.tokenizer.eos_token_id]
        encode = self.tokenizer

        def tokens(record: Mapping[str, Any]) -> list[int]:
            return list(encode(str(record[column]), add_special_tokens=False)["input_ids"]) + eos

        super().__init__(records, tokens, block_size, shuffle_buffer)
        self.model_kwargs = told(self.tokenizer, block_size)


def open_stream(name: str, file: Any, builder: str | None, column: str) -> Any:
    """The records as a `datasets.IterableDataset` read as it goes; its first record is read to check `column`."""
    datasets = hf_datasets()
    options = {"keep_linebreaks": True} if builder == "text" else {}
    try:
        if file is None:
            records = datasets.load_dataset(name, split="train", streaming=True)
        else:
            records = datasets.load_dataset(builder, data_files=str(file), split="train", streaming=True, **options)
        first = next(iter(records), None)
    except Exception as e:  # the Hub unreachable, a file that does not parse as its format
        raise ArgumentProblem("path", f"cannot load {name!r}: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    if first is None:
        raise ArgumentProblem("path", f"{name} has no records")
    if column not in first:
        raise ArgumentProblem("column", f"{name} has no column {column!r} (its columns: {', '.join(first)})")
    return records


class StreamLoader:
    """Batches of a `TokenStream` on `device`, through torchdata's `StatefulDataLoader` (whose `state_dict` holds
    each worker's stream state and the batches fetched ahead of the loop). It has no length, no epochs (the
    stream's passes are its own) and is not prepared by Accelerate, which would split the stream a second time."""

    def __init__(self, dataset: TokenStream, batch_size: int, num_workers: int, device: torch.device, seed: int):
        self.dataset, self.device = dataset, device
        loader_class = optional("torchdata.stateful_dataloader", "hf").StatefulDataLoader
        with quiet_torchdata():
            self.loader = loader_class(
                dataset,
                batch_size=batch_size,
                num_workers=num_workers,
                pin_memory=torch.cuda.is_available(),
                # Its own generator: starting an iterator draws from it, not from the global RNG (which a resumed
                # run restores before it starts iterating, so a draw there would change its dropout).
                generator=torch.Generator().manual_seed(seed),
            )

    def __iter__(self) -> Iterator[Any]:
        from accelerate.utils import send_to_device

        with quiet_torchdata():
            batches = iter(self.loader)
        for batch in batches:
            yield send_to_device(batch, self.device)

    def set_epoch(self, epoch: int) -> None:
        """Nothing: a stream's passes are its own (see `TokenStream`)."""

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state)

    def restart(self, stream_pass: int) -> None:
        """Begin again at the start of pass `stream_pass` (a saved position that does not apply here)."""
        self.dataset.fresh(stream_pass)


@contextlib.contextmanager
def quiet_torchdata() -> Iterator[None]:
    """Without the warning torchdata's own call of a deprecated torch function gives: nothing a user can act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*set_vital.*")
        yield
