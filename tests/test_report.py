"""`launcher report` on real runs made to go wrong on purpose, the plots it draws, and what TensorBoard's own
reader finds in a run dir, across resumes too."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, TINY_RECIPE, read_metrics, run_cli

from launcher.layout import complete_steps

SCENARIO = """\
model: {{_component_: mlp, hidden_sizes: {hidden}}}
data:
  dataset: {{_component_: synthetic_classification, num_features: 32, num_classes: 4}}
  train: {{split: train, num_samples: {samples}}}
  val: {{split: val, num_samples: 512}}
optimizer: {optimizer}
train: {{max_steps: {steps}, batch_size: 32, seed: 0}}
eval: {{every_steps: {every}, every_epoch: false}}
checkpoint: {{save_final: false}}
logging: {{every_steps: 5, trackers: [jsonl, tensorboard], progress_bar: false}}
"""

# name -> (recipe, findings that must be there, findings allowed besides)
SCENARIOS = {
    # A 4-unit model taking steps a thousand times too small: the loss hardly moves.
    "underfits": (
        SCENARIO.format(hidden="[4]", samples=4096, optimizer="{_component_: adam, lr: 1.0e-6}", steps=300, every=50),
        {"underfitting"},
        {"lr_too_low"},
    ),
    # 300k parameters on 64 samples, no weight decay or dropout: it learns them by heart.
    "overfits": (
        SCENARIO.format(
            hidden="[512, 512]", samples=64, optimizer="{_component_: adam, lr: 1.0e-3}", steps=300, every=25
        ),
        {"overfitting"},
        set(),
    ),
    # Plain SGD at a learning rate some thousand times too high, no clipping.
    "diverges": (
        SCENARIO.format(
            hidden="[128, 128]", samples=4096, optimizer="{_component_: sgd, lr: 200.0}", steps=300, every=50
        ),
        {"divergence"},
        {"lr_too_high"},
    ),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The three runs gone wrong, and the quickstart as it ships (healthy)."""
    root = tmp_path_factory.mktemp("report")
    out = {}
    for name, (text, _, _) in SCENARIOS.items():
        recipe = root / f"{name}.yaml"
        recipe.write_text(text)
        proc = run_cli("train", str(recipe), f"run_dir={root / name}", cwd=root)
        # The diverging run may stop itself (exit 1) once its updates are all non-finite.
        assert proc.returncode in (0, 1), proc.stderr
        out[name] = root / name
    proc = run_cli("train", str(REPO / "recipes" / "quickstart.yaml"), f"run_dir={root / 'quickstart'}", cwd=root)
    assert proc.returncode == 0, proc.stderr
    out["quickstart"] = root / "quickstart"
    return out


def findings(run_dir: Path) -> list[str]:
    proc = run_cli("report", str(run_dir), "--json")
    assert proc.returncode == 0, proc.stderr
    return [f["kind"] for f in json.loads(proc.stdout)[0]["findings"]]


@pytest.mark.parametrize("name", SCENARIOS)
def test_the_report_names_what_went_wrong_and_nothing_else(runs: dict[str, Path], name: str):
    _, required, allowed = SCENARIOS[name]
    found = set(findings(runs[name]))
    assert required <= found, (name, found)
    assert found <= required | allowed, (name, found)


def test_a_healthy_quickstart_run_gets_no_finding(runs: dict[str, Path]):
    proc = run_cli("report", str(runs["quickstart"]))
    assert proc.returncode == 0, proc.stderr
    assert "diagnosis: nothing wrong found in the curves" in proc.stdout, proc.stdout
    for line in ("model            mlp(hidden_sizes=[128, 128])", "optimizer        adam(lr=0.0003)", "throughput"):
        assert line in proc.stdout, proc.stdout
    assert re.search(r"compute       [\d.]+ [MGT]?FLOP/s per process \(mean; last [\d.]+ [MGT]?FLOP/s\)", proc.stdout)
    assert re.search(r"memory        peak [\d.]+ GiB per process", proc.stdout), proc.stdout
    # The checkpoint retention of the recipe (newest 2, best 1) and the best val/accuracy with its step.
    assert "checkpoints   " in proc.stdout and "best: " in proc.stdout
    assert re.search(r"val/accuracy  best 0\.(8[89]|9)\d* at step \d+", proc.stdout), proc.stdout


def test_the_overfitting_finding_gives_its_numbers(runs: dict[str, Path]):
    proc = run_cli("report", str(runs["overfits"]))
    text = proc.stdout
    assert "diagnosis: The model overfits" in text, text
    assert "over the last 3 evaluations val/loss rose" in text and "while train/loss fell" in text
    best = min((r["val/loss"], r["step"]) for r in read_metrics(runs["overfits"]) if "val/loss" in r)
    assert f"val/loss was best at step {best[1]}: {best[0]:.4g}" in text
    assert "weight decay" in text


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="the plots extra is not installed")
def test_plots_overlay_the_runs(runs: dict[str, Path], tmp_path: Path):
    import matplotlib.image

    names = ["underfits", "overfits", "quickstart"]
    out = tmp_path / "plots"
    proc = run_cli("report", *(str(runs[n]) for n in names), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    files = sorted(p.name for p in out.iterdir())
    # No peak FLOP/s is known on CPU (train.peak_flops not given): no MFU plot.
    assert files == ["flops.png", "grad_norm.png", "loss.png", "lr.png", "memory.png", "throughput.png"]
    image = matplotlib.image.imread(out / "loss.png")
    assert image.shape[:2] == (450, 800)
    # Each run is drawn in its own colour (matplotlib's C0, C1, C2): every one of them is on the picture.
    for color in ((0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E), (0x2C, 0xA0, 0x2C)):
        close = (abs(image[..., :3] * 255 - color) < 8).all(axis=-1)
        assert close.sum() > 100, color  # more than its legend entry (about 40 pixels) alone


def test_a_run_that_logged_almost_nothing_is_not_called_healthy(tmp_path: Path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 10, "time": 1.0, "train/loss": 1.2}\n')
    proc = run_cli("report", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "diagnosis: too few training losses logged to judge (1; needs 5)" in proc.stdout
    assert "(no recipe.yaml: settings unknown)" in proc.stdout


def test_a_folder_that_is_not_a_run_is_refused_in_one_line(tmp_path: Path):
    proc = run_cli("report", str(tmp_path))
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"error: {tmp_path}: no metrics.jsonl; not a run dir, or a run logged without the jsonl tracker "
        "(logging.trackers)"
    )


def test_a_tracker_that_is_not_installed_is_refused_before_anything_is_written(tiny_recipe: Path, tmp_path: Path):
    assert importlib.util.find_spec("dvclive") is None  # (not a dependency of the tests)
    run_dir = tmp_path / "run"
    proc = run_cli("train", str(tiny_recipe), f"run_dir={run_dir}", "logging.trackers=[jsonl,dvclive]")
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"error: {tiny_recipe}: logging.trackers: dvclive is not installed here (pip install dvclive), "
        "or leave it out of the list"
    )
    assert not run_dir.exists()


# ------------------------------------------------------------------------------------------- across resumes

RESUMABLE = [
    "train.max_steps=100000",
    "logging.every_steps=2",
    "logging.trackers=[jsonl,tensorboard]",
    "eval.every_steps=10",
    "checkpoint.every_steps=20",
    "checkpoint.keep_last=3",
]


def start(recipe: Path, run_dir: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    log = (run_dir.parent / f"attempt-{time.monotonic_ns()}.log").open("w")
    return subprocess.Popen(
        [sys.executable, "-m", "launcher", "train", str(recipe), f"run_dir={run_dir}", *RESUMABLE, *extra],
        cwd=recipe.parent,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})},
    )


def latest_checkpoint(run_dir: Path) -> int:
    return max(complete_steps(run_dir / "checkpoints"), default=0)


def wait_for_checkpoint(run_dir: Path, past: int, proc: subprocess.Popen, timeout: float = 120) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if latest_checkpoint(run_dir) > past:
            return latest_checkpoint(run_dir)
        assert proc.poll() is None, f"the run ended early ({proc.returncode})"
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint past step {past} within {timeout} s")


CRASHING_MLP = """\
import os

from launcher.models.mlp import MLP


class CrashingMLP(MLP):
    \"\"\"With CRASH_AT_CALL=N: outputs scaled (so this attempt's losses differ from any other's) and an error
    raised at the N-th training forward call.\"\"\"

    calls = 0

    def forward(self, x):
        crash_at = int(os.environ.get("CRASH_AT_CALL", "0"))
        if not crash_at or not self.training:
            return super().forward(x)
        CrashingMLP.calls += 1
        if CrashingMLP.calls == crash_at:
            raise RuntimeError("injected failure")
        return super().forward(x) * 1.5
"""


@pytest.fixture(scope="module")
def resumed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run that fails at step 51 (after logging steps its checkpoint at 40 does not hold: they are rolled back,
    in metrics.jsonl and in TensorBoard), resumed, stopped by SIGTERM (it saves), and resumed again to its end:
    three attempts."""
    root = tmp_path_factory.mktemp("resumed")
    (root / "crashing.py").write_text(CRASHING_MLP)
    recipe = root / "tiny.yaml"
    recipe.write_text(TINY_RECIPE.replace("_component_: mlp,", "_component_: crashing.CrashingMLP,"))
    run_dir = root / "run"
    first = start(recipe, run_dir, env={"CRASH_AT_CALL": "51"})
    assert first.wait(120) == 1
    assert latest_checkpoint(run_dir) == 40 and max(r["step"] for r in read_metrics(run_dir)) == 50
    second = start(recipe, run_dir, "resume=auto")
    wait_for_checkpoint(run_dir, 40, second)
    second.send_signal(signal.SIGTERM)
    assert second.wait(60) == 0
    stopped_at = latest_checkpoint(run_dir)  # where SIGTERM's save left it
    proc = run_cli("train", str(recipe), f"run_dir={run_dir}", *RESUMABLE[1:], "resume=auto",
                   f"train.max_steps={stopped_at + 30}", cwd=root)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return run_dir


def test_the_report_of_a_resumed_run_counts_its_attempts_and_every_step_once(resumed: Path, tmp_path: Path):
    proc = run_cli("report", str(resumed), "--json", "--out", str(tmp_path / "plots"))
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout)[0]
    rows = read_metrics(resumed)
    steps = [r["step"] for r in rows if "train/loss" in r]
    # Every 2nd step and the last: one row each, those the failed attempt logged after step 40 replaced.
    assert steps[:-1] == list(range(2, steps[-1], 2)), steps
    assert record["steps"] == steps[-1] and record["stop_reason"] == "done"
    assert (record["attempts"], record["resumes"]) == (3, 2)
    assert record["train_seconds"] > 0
    assert (tmp_path / "plots" / "loss.png").stat().st_size > 10_000


def test_tensorboard_finds_every_scalar_at_its_step_across_resumes(resumed: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(resumed / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    rows = read_metrics(resumed)
    for tag in ("train/loss", "val/loss", "lr", "grad_norm"):
        expected = {r["step"]: r[tag] for r in rows if r.get(tag) is not None}
        found = {e.step: e.value for e in events.Scalars(tag)}
        assert len(events.Scalars(tag)) == len(expected) and sorted(found) == sorted(expected), tag
        assert all(found[s] == pytest.approx(v, rel=1e-6) for s, v in expected.items()), tag
    # The recipe as TensorBoard HPARAMS, in the same run as its scalars.
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = events.PluginTagToContent("hparams")
    start_info = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    assert start_info.session_start_info.hparams["optimizer.lr"].number_value == pytest.approx(0.003)
