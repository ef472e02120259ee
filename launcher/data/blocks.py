"""Where the blocks of a token stream start, epoch by epoch: the built-in language-modelling sets (`char_text`,
`token_memmap`) cut the stream into blocks of `block_size` inputs (and the next token of each as its target).

`offsets: fixed` starts them at 0, `block_size`, `2 * block_size`, ... every epoch: each epoch shows the model the
same contexts. `offsets: random` shifts them all, each epoch, by one offset in [0, block_size) drawn from the seed
and the epoch alone, so a resumed run, on any number of processes, cuts each epoch into the same blocks as the
uninterrupted run.
The val split always keeps fixed blocks: its evaluations stay comparable across a run and between runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from launcher.components import SEED_LIMIT, describe, integer_problem

OFFSETS = ("fixed", "random")


def block_count(tokens: int, block_size: int, random: bool) -> int:
    """Blocks of `block_size + 1` tokens (inputs and targets) that fit in `tokens`, at every offset a block may be
    shifted by: the same count every epoch, so the run's budget and the resume position stay valid."""
    spare = block_size - 1 if random else 0  # the largest shift
    return max(tokens - 1 - spare, 0) // block_size


def epoch_offset(seed: int, epoch: int, block_size: int) -> int:
    """The shift of every block in `epoch`, in [0, block_size): a function of its arguments alone (numpy's
    SeedSequence of the two numbers, the same on every machine and process)."""
    return int(np.random.default_rng([seed, epoch]).integers(block_size))


class BlockStarts:
    """The start of block `i` in the current epoch; `set_epoch` moves every block (with `random`)."""

    def __init__(self, block_size: int, random: bool = False, seed: int = 0):
        self.block_size, self.random, self.seed = block_size, random, seed
        self.set_epoch(0)

    def count(self, tokens: int) -> int:
        return block_count(tokens, self.block_size, self.random)

    def set_epoch(self, epoch: int) -> None:
        self.offset = epoch_offset(self.seed, epoch, self.block_size) if self.random else 0

    def __call__(self, i: int) -> int:
        return self.offset + i * self.block_size


def offsets_problems(args: Mapping[str, Any]) -> list[tuple[str, str | None]]:
    """(argument, problem) pairs for `offsets` and `seed`, as the sets' `check_args` give them."""
    offsets = args.get("offsets")
    wrong = None if offsets in OFFSETS else f"expected one of: {', '.join(OFFSETS)}; got {describe(offsets)}"
    return [("offsets", wrong), ("seed", integer_problem(args.get("seed"), 0, SEED_LIMIT - 1))]


def starts_for(
    split: str, block_size: int, offsets: str, seed: int, tokens: int, name: str, unit: str = "tokens"
) -> BlockStarts:
    """The block starts of a split of `tokens` tokens (`name` and `unit`: the file and what it holds, for the
    message); ValueError for what the set cannot do."""
    if offsets not in OFFSETS:
        raise ValueError(f"offsets must be one of {', '.join(OFFSETS)}, got {offsets!r}")
    starts = BlockStarts(block_size, random=offsets == "random" and split == "train", seed=seed)
    if starts.count(tokens) < 1:
        need = "2 * block_size" if starts.random else "block_size + 1"
        raise ValueError(f"{name}: the {split} split has {tokens} {unit}, fewer than {need}")
    return starts


class Blocks(Dataset):
    """A token stream cut into blocks whose starts move each epoch with `offsets: random` (`cut`, in the set's
    constructor): its length, and `set_epoch`, which the training loop calls before each epoch."""

    def cut(self, split: str, block_size: int, offsets: str, seed: int, name: str, unit: str = "tokens") -> None:
        """Cut `self.tokens` (already set) into blocks of `block_size`; ValueError for what the set cannot do."""
        self.block_size = block_size
        self.starts = starts_for(split, block_size, offsets, seed, len(self.tokens), name, unit)
        self.blocks = self.starts.count(len(self.tokens))
        self.epochs_differ = self.starts.random  # fixed blocks: DataLoader workers may persist across epochs

    def __len__(self) -> int:
        return self.blocks

    def set_epoch(self, epoch: int) -> None:
        """Where this epoch's blocks start (with `offsets: random`); the training loop calls it before each epoch."""
        self.starts.set_epoch(epoch)
