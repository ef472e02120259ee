"""`hf_text` with `streaming: true`, with real processes: the ranks read disjoint shares that together make the
stream; a two-process run SIGKILLed twice and resumed each time logs the losses of the run that never stopped, bit
for bit; resumed on another number of processes it warns in one line and goes on; an epoch budget is refused in one
line, exit 2. Nothing is downloaded (the data and tokenizer are test_hf's)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import finish, run_cli, start_ranks
from test_distributed import TIMEOUT
from test_hf import LLAMA, data, kill_after_a_checkpoint, losses  # noqa: F401 (data: the fixture)

STREAM = """\
model: {_component_: hf_causal_lm, config: LLAMA}
data:
  dataset:
    _component_: hf_text
    path: DATA/split_{split}.jsonl
    tokenizer: DATA/tokenizer
    block_size: 32
    cache_dir: DATA/cache
    streaming: true
    shuffle_buffer: 16
optimizer: {_component_: adamw, lr: 0.003}
train: {max_steps: 16, batch_size: 4, seed: 5}
eval: {every_steps: 8, every_epoch: false, max_batches: 2}
checkpoint: {every_steps: 2, keep_last: 2}
logging: {every_steps: 1, trackers: [jsonl], progress_bar: false}
strategy: {timeout_s: 60}
"""


@pytest.fixture(scope="module")
def split_data(data: Path) -> Path:  # noqa: F811 (the fixture imported above)
    """test_hf's paragraphs as one file per split: the train split streamed, the val split read map-style."""
    lines = (data / "text.jsonl").read_text().splitlines(keepends=True)
    (data / "split_train.jsonl").write_text("".join(lines[:-40]))
    (data / "split_val.jsonl").write_text("".join(lines[-40:]))
    return data


def stream_recipe(data: Path, tmp_path: Path) -> Path:  # noqa: F811
    path = tmp_path / "stream.yaml"
    path.write_text(STREAM.replace("LLAMA", LLAMA).replace("DATA", str(data)))
    return path


def test_the_ranks_shares_are_disjoint_and_together_make_one_pass(tmp_path: Path):
    from launcher.data.hf import HFText
    from launcher.data.streaming import TokenStream

    size = 16  # each record is one block: 15 bytes and the end-of-text token
    records = [f"record {i:08d}"[:15] for i in range(23)]
    (tmp_path / "r.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in records))
    shares = []
    for rank in range(2):
        stream = HFText(
            path=str(tmp_path / "r.jsonl"), tokenizer="bytes", block_size=size, streaming=True, shuffle_buffer=4
        )
        assert isinstance(stream, TokenStream)
        stream.share(rank, 2, shuffle=True, seed=7)
        seen = []
        for block in stream:
            if stream.stream_pass > 0:
                break
            seen.append(stream_text(stream, block["input_ids"].tolist()))
        shares.append(seen)
    assert not set(shares[0]) & set(shares[1])
    assert sorted(shares[0] + shares[1]) == sorted(records)  # each record once, in one share or the other
    assert shares[0] != sorted(shares[0])  # shuffled in the buffer


def stream_text(stream: object, ids: list[int]) -> str:
    assert ids[-1] == stream.tokenizer.eos_token_id  # type: ignore[attr-defined]
    return stream.tokenizer.decode(ids[:-1])  # type: ignore[attr-defined]


@pytest.mark.slow
def test_a_streaming_run_killed_twice_resumes_bitwise_and_warns_on_another_world_size(split_data: Path, tmp_path: Path):
    path = stream_recipe(split_data, tmp_path)
    full, crashed = tmp_path / "full", tmp_path / "crashed"
    results = finish(start_ranks(2, "train", str(path), f"run_dir={full}", cwd=tmp_path), TIMEOUT)
    assert [rc for rc, _, _ in results] == [0, 0], results

    first = kill_after_a_checkpoint(
        start_ranks(2, "train", str(path), f"run_dir={crashed}", cwd=tmp_path), crashed / "checkpoints", past=0
    )
    resumed = start_ranks(2, "train", str(path), f"run_dir={crashed}", "resume=auto", cwd=tmp_path)
    second = kill_after_a_checkpoint(resumed, crashed / "checkpoints", first)
    assert first < second < 16
    results = finish(start_ranks(2, "train", str(path), f"run_dir={crashed}", "resume=auto", cwd=tmp_path), TIMEOUT)
    assert [rc for rc, _, _ in results] == [0, 0], results
    assert f"at step {second}" in results[0][1]
    assert losses(crashed) == losses(full) and sorted(losses(full)) == list(range(1, 17))  # bitwise

    proc = run_cli("train", str(path), f"run_dir={full}", "resume=auto", "train.max_steps=18", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    warning = [line for line in proc.stdout.splitlines() if line.startswith("warning: written by 2 processes")]
    assert len(warning) == 1 and "every process starts its new share at the start of pass 0" in warning[0]
    assert sorted(losses(full)) == list(range(1, 19))


@pytest.mark.parametrize(
    "command, overrides, expected",
    [
        ("train", ["~train.max_steps", "train.max_epochs=1"], "train.max_epochs: a streamed train set"),
        ("validate", ["data.dataset.path=DATA/text.jsonl"], "streaming: a streamed train set has no held-out tail"),
    ],
)
def test_what_a_stream_cannot_do_is_refused_in_one_line(
    split_data: Path, tmp_path: Path, command: str, overrides: list[str], expected: str
):
    path = stream_recipe(split_data, tmp_path)
    given = [o.replace("DATA", str(split_data)) for o in overrides]
    proc = run_cli(command, str(path), f"run_dir={tmp_path / 'run'}", *given, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert len(lines) == 1 and expected in lines[0], proc.stderr
    assert not (tmp_path / "run").exists()
