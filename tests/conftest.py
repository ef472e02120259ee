"""Shared helpers: the CLI in a subprocess (as users run it), with a timeout so a hang fails fast."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"


def run_cli(*args: str, cwd: Path | str = REPO, timeout: float = 300, launcher: list[str] | None = None):
    """Run `python -m launcher ARGS` (or LAUNCHER + ARGS) and return the finished process."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    cmd = (launcher or [sys.executable, "-m", "launcher"]) + list(args)
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


TINY_RECIPE = """\
model: {_component_: mlp, hidden_sizes: [32]}
data:
  dataset: {_component_: synthetic_classification, num_features: 8, num_classes: 3}
  train: {split: train, num_samples: 512}
  val: {split: val, num_samples: 256}
optimizer: {_component_: adam, lr: 0.003}
train: {max_steps: 40, batch_size: 32, seed: 3}
eval: {every_steps: 20, every_epoch: false}
checkpoint: {every_steps: 20, keep_last: 2}
logging: {every_steps: 1, trackers: [jsonl], progress_bar: false}
"""


@pytest.fixture
def tiny_recipe(tmp_path: Path) -> Path:
    """A recipe that trains in a couple of seconds on one CPU core."""
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_RECIPE)
    return path
