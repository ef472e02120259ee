"""Built-in datasets: deterministic, split without overlap, and telling the model what it needs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from conftest import REPO, refused_alike

from launcher.data.blocks import epoch_offset
from launcher.data.memmap import TokenMemmap
from launcher.data.synthetic import SyntheticClassification
from launcher.data.text import CharText

GPT = REPO / "recipes" / "gpt_ddp.yaml"


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


def test_random_offsets_move_the_train_blocks_each_epoch_from_the_seed_alone(tmp_path: Path):
    offsets = {seed: [epoch_offset(seed, epoch, 64) for epoch in range(8)] for seed in (0, 1)}
    assert offsets[0] == [epoch_offset(0, epoch, 64) for epoch in range(8)]  # the same seed and epoch: the same
    assert len(set(offsets[0])) > 1 and offsets[0] != offsets[1]  # epochs differ, and seeds
    assert all(0 <= o < 64 for o in offsets[0] + offsets[1])
    tokens = np.arange(1003, dtype=np.uint16)
    tokens.tofile(tmp_path / "all.bin")
    path = tmp_path / "t.txt"
    path.write_text("".join(chr(65 + i % 50) for i in range(1003)))
    for cls, source in ((TokenMemmap, tmp_path / "all.bin"), (CharText, path)):
        fixed = cls(str(source), "train", block_size=10)
        train = cls(str(source), "train", block_size=10, offsets="random", seed=3)
        val = cls(str(source), "val", block_size=10, offsets="random", seed=3)
        assert len(fixed) == (902 - 1) // 10 and len(train) == (902 - 10) // 10  # 90% of 1003: 902
        for epoch in range(6):
            train.set_epoch(epoch)
            val.set_epoch(epoch)
            assert train.starts.offset == epoch_offset(3, epoch, 10) and val.starts.offset == 0
        for train.starts.offset in (0, 9):  # the smallest and largest shift
            for i in (0, len(train) - 1):  # the first and last block stay in the split, the target shifted by one
                x, y = train[i]
                assert len(x) == len(y) == 10 and torch.equal(x[1:], y[:-1])
                assert cls is CharText or x[0].item() == train.starts.offset + 10 * i
        assert cls.check_args({**_defaults(cls), "offsets": "shuffled", "seed": -1}) == [
            ("offsets", "expected one of: fixed, random; got a string ('shuffled')"),
            ("seed", "must be >= 0, got -1"),
        ]


def _defaults(cls: type) -> dict:
    from launcher.components import effective_args

    return effective_args(cls, {"path": "x", "vocab_size": None})


def test_the_train_set_is_told_the_epoch_where_accelerate_does_not_pass_it_on(tmp_path: Path):
    # With several processes (or a resume inside an epoch) the shuffling sampler takes the epoch, and accelerate's
    # loader passes it no further: the run's parts tell the set themselves.
    from accelerate.data_loader import BatchSamplerShard, DataLoaderShard, SeedableRandomSampler
    from torch.utils.data import BatchSampler

    from launcher.build import Parts

    (tmp_path / "t.txt").write_text("abcdefghij" * 100)
    train = CharText(str(tmp_path / "t.txt"), "train", block_size=8, offsets="random", seed=1)
    sampler = BatchSamplerShard(BatchSampler(SeedableRandomSampler(train), 4, False), num_processes=2, process_index=0)
    loader = DataLoaderShard(train, batch_sampler=sampler)
    epoch = next(e for e in range(1, 10) if epoch_offset(1, e, 8) != epoch_offset(1, 0, 8))
    loader.set_epoch(epoch)
    assert train.starts.offset == epoch_offset(1, 0, 8)  # accelerate alone left it at epoch 0's blocks
    Parts(None, None, None, loader, None, None).set_epoch(epoch)
    assert train.starts.offset == epoch_offset(1, epoch, 8)


def test_only_a_set_whose_epochs_differ_gets_new_loader_workers_each_epoch(tmp_path: Path):
    from launcher.build import changes_with_epoch

    (tmp_path / "t.txt").write_text("abcdefghij" * 100)
    fixed, moving = (CharText(str(tmp_path / "t.txt"), block_size=8, offsets=o) for o in ("fixed", "random"))
    assert changes_with_epoch(moving) and not changes_with_epoch(fixed)
    assert not changes_with_epoch(SyntheticClassification("train", 8))


def test_a_token_file_of_no_whole_number_of_tokens_is_refused_naming_key_file_size_and_dtype(tmp_path: Path):
    np.arange(3000, dtype=np.uint16).tofile(tmp_path / "val.bin")
    (tmp_path / "train.bin").write_bytes(np.arange(3000, dtype=np.uint16).tobytes() + b"x")  # one byte over
    refused = refused_alike(GPT, f"data.dataset.path={tmp_path}/{{split}}.bin", work=tmp_path / "work")
    assert refused == [
        f"data.dataset.path: {tmp_path}/train.bin has 6,001 bytes, not a whole number of uint16 tokens (2 bytes each): "
        "is dtype the one it was written with, or is the file cut short?"
    ]
    (tmp_path / "train.bin").write_bytes(b"")
    empty = refused_alike(GPT, f"data.dataset.path={tmp_path}/{{split}}.bin", work=tmp_path / "empty")
    assert empty == [f"data.dataset.path: {tmp_path}/train.bin is empty: it holds no tokens"]
