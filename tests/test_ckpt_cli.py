"""`launcher ckpt info` and `launcher ckpt export`, on checkpoints a real run wrote."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import run_cli
from safetensors.torch import load_file

from launcher.models.gpt import GPT

GPT_RECIPE = """\
model: {_component_: gpt, n_layer: 1, n_head: 2, n_embd: 16}
data:
  dataset: {_component_: char_text, path: text.txt, block_size: 16}
optimizer: {_component_: adamw, lr: 0.01}
train: {max_steps: 6, batch_size: 4}
eval: {every_steps: 3, every_epoch: false, max_batches: 2}
checkpoint: {every_steps: 3, keep_best: 1}
logging: {trackers: [jsonl], progress_bar: false}
"""


@pytest.fixture(scope="module")
def gpt_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("gpt")
    (root / "text.txt").write_text("to be or not to be, that is the question. " * 40)
    (root / "gpt.yaml").write_text(GPT_RECIPE)
    proc = run_cli("train", "gpt.yaml", "run_dir=run", cwd=root)
    assert proc.returncode == 0, proc.stderr
    return root / "run"


def test_export_gives_a_plain_state_dict_even_with_tied_weights(gpt_run: Path, tmp_path: Path):
    out = tmp_path / "model.safetensors"
    proc = run_cli("ckpt", "export", str(gpt_run / "checkpoints" / "latest"), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    weights = load_file(str(out))
    vocab = weights["wte.weight"].shape[0]
    model = GPT(vocab_size=vocab, block_size=16, n_layer=1, n_head=2, n_embd=16)
    model.load_state_dict(weights, strict=True)  # every key, lm_head.weight (tied to wte) included
    assert torch.equal(weights["lm_head.weight"], weights["wte.weight"])
    assert set(weights) == set(model.state_dict())


def test_export_refuses_to_overwrite(gpt_run: Path, tmp_path: Path):
    out = tmp_path / "model.safetensors"
    out.write_text("precious")
    proc = run_cli("ckpt", "export", str(gpt_run / "checkpoints" / "latest"), "--out", str(out))
    assert proc.returncode == 2 and out.read_text() == "precious"
    assert proc.stderr.strip() == f"error: --out: {out} exists; pass --force to replace it"


def test_info_lists_a_run_and_resolves_best(gpt_run: Path):
    proc = run_cli("ckpt", "info", str(gpt_run))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) >= 2 and all(line.endswith(", complete") for line in lines)
    assert lines[-1].startswith(f"{gpt_run / 'checkpoints' / 'step_00000006'}: step 6, ")
    assert "world size 1, strategy ddp, model gpt" in lines[-1]
    best = run_cli("ckpt", "info", str(gpt_run / "checkpoints" / "best"))
    assert best.returncode == 0 and "metric val/loss " in best.stdout


def test_info_names_an_incomplete_checkpoint(gpt_run: Path, tmp_path: Path):
    partial = tmp_path / "step_00000009"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"half")
    proc = run_cli("ckpt", "info", str(partial))
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"{partial}: incomplete (an interrupted save; resume ignores it), 4.0 B in 1 files"
    missing = run_cli("ckpt", "info", str(tmp_path / "nope"))
    assert missing.returncode == 2 and "no such checkpoint" in missing.stderr
