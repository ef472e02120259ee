"""Token streams on disk for LM pretraining: raw `.bin` arrays (as nanoGPT writes them) or `.npy` files.

The file is memory-mapped, never read whole, so it may be far larger than memory.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from launcher.components import ArgumentProblem, describe, fraction_problem, integer_problem
from launcher.data.blocks import Blocks, offsets_problems


class TokenMemmap(Blocks):
    """Non-overlapping blocks of `block_size` tokens; the target is the input shifted by one.

    `path` may hold `{split}` (`data/{split}.bin` reads `data/train.bin` and `data/val.bin`); otherwise one file
    is split by position, its last `val_fraction` being val. `offsets: random` shifts the train split's blocks each
    epoch (`set_epoch`) by an offset drawn from `seed` (training gives it `train.seed`) and the epoch; see
    `launcher/data/blocks.py`.
    """

    def __init__(
        self,
        path: str,
        split: str = "train",
        block_size: int = 1024,
        dtype: str = "uint16",
        val_fraction: float = 0.1,
        vocab_size: int | None = None,
        offsets: str = "fixed",
        seed: int = 0,
    ):
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        file = Path(path.replace("{split}", split))
        tokens = np.load(file, mmap_mode="r") if file.suffix == ".npy" else _token_file(file, np.dtype(dtype))
        if "{split}" not in path:
            cut = int(len(tokens) * (1 - val_fraction))
            tokens = tokens[:cut] if split == "train" else tokens[cut:]
        self.tokens = tokens
        self.cut(split, block_size, offsets, seed, str(file))
        self.model_kwargs = {"block_size": block_size}
        if vocab_size is not None:
            self.model_kwargs["vocab_size"] = vocab_size

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = self.starts(i)
        chunk = torch.from_numpy(np.asarray(self.tokens[start : start + self.block_size + 1], dtype=np.int64))
        return chunk[:-1], chunk[1:]

    @staticmethod
    def check_args(args: Mapping[str, Any]) -> list[tuple[str, str]]:
        """(argument, problem) pairs for what the constructor would refuse; `args` with defaults filled in."""
        checks = [
            ("block_size", integer_problem(args.get("block_size"), 1)),
            ("dtype", _dtype_problem(args.get("dtype"))),
            ("val_fraction", fraction_problem(args.get("val_fraction"))),
            *offsets_problems(args),
        ]
        if args.get("vocab_size") is not None:
            checks.append(("vocab_size", integer_problem(args["vocab_size"], 1)))
        if args.get("split") not in ("train", "val"):
            checks.append(("split", f"expected one of: train, val; got {describe(args.get('split'))}"))
        return [(name, problem) for name, problem in checks if problem]


def _token_file(file: Path, dtype: np.dtype) -> np.memmap:
    """The raw file's tokens, memory-mapped. A size that is no whole number of tokens (another dtype, or a file
    cut short) is refused naming the file, its size and the dtype: numpy's own error names none of them."""
    size = file.stat().st_size
    if size == 0:
        raise ArgumentProblem("path", f"{file} is empty: it holds no tokens")
    if size % dtype.itemsize:
        raise ArgumentProblem(
            "path",
            f"{file} has {size:,} bytes, not a whole number of {dtype.name} tokens ({dtype.itemsize} bytes each): "
            "is dtype the one it was written with, or is the file cut short?",
        )
    return np.memmap(file, dtype=dtype, mode="r")


def _dtype_problem(name: Any) -> str | None:
    try:
        kind = np.dtype(name).kind
    except (TypeError, ValueError):
        kind = None
    # Token files hold integers; a float file still reads (truncated), but strings or objects cannot be memory-mapped.
    return None if kind in ("i", "u", "f") else f"expected a number dtype such as uint16 or int32, got {describe(name)}"


def write_bytes(text_file: Path, out_dir: Path, val_fraction: float = 0.1) -> dict[str, int]:
    """Byte-level tokens (one per byte, vocabulary 256) of a file, as `train.bin` and `val.bin` (uint16, the
    default dtype of `TokenMemmap`), the last `val_fraction` of the file being val. Needs no tokenizer."""
    data = np.frombuffer(Path(text_file).read_bytes(), dtype=np.uint8).astype(np.uint16)
    cut = int(len(data) * (1 - val_fraction))
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split, tokens in (("train", data[:cut]), ("val", data[cut:])):
        tmp = out_dir / f".{split}.bin.tmp"
        tokens.tofile(tmp)
        tmp.replace(out_dir / f"{split}.bin")
        counts[split] = len(tokens)
    return counts
