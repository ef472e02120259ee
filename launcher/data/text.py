"""Character-level language modelling on any local text file, split into train and val by position."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from launcher.components import describe, fraction_problem, integer_problem
from launcher.data.blocks import Blocks, offsets_problems


class CharText(Blocks):
    """Non-overlapping blocks of `block_size` characters; the target is the input shifted by one.

    The vocabulary is every character of the whole file, so train and val share one encoding. The first
    `1 - val_fraction` of the file is train, the rest val. `offsets: random` shifts the train split's blocks each
    epoch (`set_epoch`) by an offset drawn from `seed` (training gives it `train.seed`) and the epoch; see
    `launcher/data/blocks.py`.
    """

    def __init__(
        self,
        path: str,
        split: str = "train",
        block_size: int = 128,
        val_fraction: float = 0.1,
        offsets: str = "fixed",
        seed: int = 0,
    ):
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        text = Path(path).read_text(encoding="utf-8")
        self.vocab = sorted(set(text))
        cut = int(len(text) * (1 - val_fraction))
        part = text[:cut] if split == "train" else text[cut:]
        index = {ch: i for i, ch in enumerate(self.vocab)}
        self.tokens = torch.tensor([index[ch] for ch in part], dtype=torch.long)
        self.cut(split, block_size, offsets, seed, path, "characters")
        self.model_kwargs = {"vocab_size": len(self.vocab), "block_size": block_size}

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = self.starts(i)
        chunk = self.tokens[start : start + self.block_size + 1]
        return chunk[:-1], chunk[1:]

    def decode(self, ids: list[int]) -> str:
        return "".join(self.vocab[i] for i in ids)

    @staticmethod
    def check_args(args: Mapping[str, Any]) -> list[tuple[str, str]]:
        """(argument, problem) pairs for what the constructor would refuse; `args` with defaults filled in."""
        checks = [
            ("block_size", integer_problem(args.get("block_size"), 1)),
            ("val_fraction", fraction_problem(args.get("val_fraction"), zero=False)),
            *offsets_problems(args),
        ]
        if args.get("split") not in ("train", "val"):
            checks.append(("split", f"expected one of: train, val; got {describe(args.get('split'))}"))
        return [(name, problem) for name, problem in checks if problem]
