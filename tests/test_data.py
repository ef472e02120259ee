"""Built-in datasets: deterministic, split without overlap, and telling the model what it needs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from launcher.data.memmap import TokenMemmap
from launcher.data.synthetic import SyntheticClassification
from launcher.data.text import CharText


def test_synthetic_is_deterministic_and_splits_differ():
    a, b = SyntheticClassification("train", 64, seed=5), SyntheticClassification("train", 64, seed=5)
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    val = SyntheticClassification("val", 64, seed=5)
    assert not torch.equal(a.x, val.x)
    assert a.model_kwargs == {"in_features": 32, "num_classes": 4}
    assert set(a.y.tolist()) == {0, 1, 2, 3}


def test_char_text_shares_one_vocabulary_and_shifts_targets(tmp_path: Path):
    path = tmp_path / "t.txt"
    path.write_text("abcdefghij" * 10 + "XYZ")  # X, Y, Z only in the val part
    train, val = CharText(str(path), "train", block_size=8), CharText(str(path), "val", block_size=8)
    assert train.vocab == val.vocab and "Z" in train.vocab
    x, y = train[1]
    assert train.decode(x.tolist()) == "ijabcdef" and torch.equal(y[:-1], x[1:])
    assert len(train) == (92 - 1) // 8  # the first 90% of 103 characters
    assert train.model_kwargs == {"vocab_size": len(train.vocab), "block_size": 8}


def test_token_memmap_reads_bin_npy_and_split_files(tmp_path: Path):
    tokens = np.arange(1000, dtype=np.uint16)
    tokens.tofile(tmp_path / "all.bin")
    np.save(tmp_path / "all.npy", tokens.astype(np.int32))
    for name in ("all.bin", "all.npy"):
        train = TokenMemmap(str(tmp_path / name), "train", block_size=10, vocab_size=1000)
        val = TokenMemmap(str(tmp_path / name), "val", block_size=10, vocab_size=1000)
        x, y = train[2]
        assert x.tolist() == list(range(20, 30)) and y.tolist() == list(range(21, 31))
        assert val[0][0][0].item() == 900
        assert train.model_kwargs == {"block_size": 10, "vocab_size": 1000}
    tokens[:500].tofile(tmp_path / "train.bin")
    tokens[500:].tofile(tmp_path / "val.bin")
    val = TokenMemmap(str(tmp_path / "{split}.bin"), "val", block_size=10)
    assert val[0][0][0].item() == 500 and len(val) == (500 - 1) // 10
