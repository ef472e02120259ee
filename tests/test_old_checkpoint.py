"""A checkpoint written by an earlier release still resumes, and the resumed run ends where that release's own
uninterrupted run ended: the same weights and logged values, within the last bits (the fixture was written on
another machine, whose CPU kernels may round the last bit of a sum otherwise; bitwise equality is tested only
between runs a test makes itself).

The fixture (`fixtures/old_checkpoint/`) is step 3 of a 6-step run of `recipe.yaml`, written by launcher 0.1.0
with its checksum manifest; `expected_step_6.safetensors` and `expected_metrics.jsonl` are that run's end. That
release logged as `lr` the rate of the update after the row's; the rows now log the rate of the row's own update, so
`lr` is checked against the schedule instead.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import read_metrics, run_cli
from safetensors.torch import load_file

from launcher import schedules

FIXTURE = Path(__file__).parent / "fixtures" / "old_checkpoint"


def test_a_checkpoint_of_an_earlier_release_resumes_to_the_same_end(tmp_path: Path):
    run_dir = tmp_path / "run"
    shutil.copytree(FIXTURE / "step_00000003", run_dir / "checkpoints" / "step_00000003")
    done = run_cli("train", str(FIXTURE / "recipe.yaml"), f"run_dir={run_dir}", "resume=auto", timeout=120)
    assert done.returncode == 0, done.stderr
    assert "resumed from" in done.stdout and "at step 3" in done.stdout
    # Its optimizer state has one group: the run keeps weight decay on every parameter, and says so.
    assert "note: this checkpoint was written with weight decay on every parameter" in done.stdout

    expected = load_file(FIXTURE / "expected_step_6.safetensors")
    got = load_file(run_dir / "checkpoints" / "step_00000006" / "model.safetensors")
    assert expected.keys() == got.keys()
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-5, atol=1e-6)

    keys = ("step", "train/loss", "lr", "grad_norm", "val/loss", "val/accuracy")
    rows = [{k: v for k, v in row.items() if k in keys} for row in read_metrics(run_dir) if row["step"] > 3]
    wanted = [json.loads(line) for line in (FIXTURE / "expected_metrics.jsonl").read_text().splitlines()]
    assert [row.keys() for row in rows] == [row.keys() for row in wanted]
    factor = schedules.build("cosine", 6, warmup_steps=2)  # the fixture recipe's schedule
    for row, want in zip(rows, wanted, strict=True):
        if "lr" in row:
            assert row.pop("lr") == pytest.approx(0.003 * factor(row["step"] - 1), rel=1e-12)
            del want["lr"]
        assert row == pytest.approx(want, rel=1e-5, abs=1e-7)
