"""Crashes and resumes with real processes: a killed run continues as if nothing happened; a checkpoint is whole
or ignored; nothing in a checkpoint is unpickled; only the main process writes."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY_RECIPE, finish, read_metrics, reseal, run_cli
from conftest import start_ranks as _start_ranks
from safetensors.torch import load_file
from test_distributed import TIMEOUT

from launcher import checkpoint

# Long enough to be killed in the middle of, short enough to finish uninterrupted in a few seconds; 8 updates per
# epoch with 2 processes, so most checkpoints (every 10) fall inside an epoch, and a log line every 7 steps, so most
# fall inside a log window too: the first line after the resume averages steps from before it.
RUN = [
    "train.max_steps=120",
    "checkpoint.every_steps=10",
    "checkpoint.keep_last=50",
    "eval.every_steps=null",
    "logging.every_steps=7",
    "strategy.timeout_s=60",
]
LOGGED = [*range(7, 120, 7), 120]


def start_ranks(n: int, recipe: Path, run_dir: Path, *overrides: str) -> list[subprocess.Popen]:
    return _start_ranks(n, "train", str(recipe), f"run_dir={run_dir}", *RUN, *overrides, cwd=run_dir.parent)


def losses(run_dir: Path) -> dict[int, float]:
    rows = [r for r in read_metrics(run_dir) if "train/loss" in r]
    steps = [r["step"] for r in rows]
    assert len(steps) == len(set(steps)), "a step was logged twice"
    return {r["step"]: r["train/loss"] for r in rows}


VARIANTS = {
    "ddp": [],
    "ddp-async": ["checkpoint.async_save=true"],
    # DeepSpeed's format; ZeRO-3's killed two-process resume is tests/test_hf.py's, with a Hugging Face model. FSDP's
    # (DCP) are tests/test_tensor_parallel.py's (on a 2-D mesh) and tests/test_storage.py's.
    "zero2": ["strategy.name=deepspeed", "strategy.deepspeed.zero_stage=2"],
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_a_killed_two_process_run_resumes_bitwise(tmp_path: Path, variant: str):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(TINY_RECIPE.replace("hidden_sizes: [32]}", "hidden_sizes: [32], dropout: 0.1}"))
    full, crashed = tmp_path / "full", tmp_path / "crashed"
    mode = VARIANTS[variant]
    assert [rc for rc, _, _ in finish(start_ranks(2, recipe, full, *mode), TIMEOUT)] == [0, 0]

    procs = start_ranks(2, recipe, crashed, *mode)
    deadline = time.monotonic() + TIMEOUT
    while (
        not checkpoint.complete_steps(crashed / "checkpoints")
        or max(checkpoint.complete_steps(crashed / "checkpoints")) < 40
    ):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
        time.sleep(0.05)
    for p in procs:  # the whole job dies at once, as when a node is lost
        p.send_signal(signal.SIGKILL)
    for p in procs:
        p.wait()
    resumed_from = max(checkpoint.complete_steps(crashed / "checkpoints"))
    assert resumed_from < 120 and resumed_from % 7, "the kill should come mid-run, inside a log window"

    results = finish(start_ranks(2, recipe, crashed, *mode, "resume=auto"), TIMEOUT)
    assert [rc for rc, _, _ in results] == [0, 0], results
    assert f"resumed from {crashed / 'checkpoints' / checkpoint.step_dir_name(resumed_from)}" in results[0][1]
    full_losses, resumed_losses = losses(full), losses(crashed)
    assert sorted(resumed_losses) == LOGGED
    assert all(resumed_losses[s] == full_losses[s] for s in LOGGED)  # bitwise, before and after the resume


@pytest.mark.parametrize("mode", ["checkpoint.async_save=false", "checkpoint.async_save=true", "strategy.name=fsdp"])
def test_a_kill_during_a_save_leaves_the_previous_checkpoint(tmp_path: Path, mode: str):
    # A big model makes each save take a while; the process is killed while the next one is being written.
    recipe = tmp_path / "r.yaml"
    recipe.write_text(TINY_RECIPE.replace("hidden_sizes: [32]", "hidden_sizes: [2048, 2048]"))
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [
        sys.executable,
        "-m",
        "launcher",
        "train",
        str(recipe),
        f"run_dir={run_dir}",
        *RUN,
        "checkpoint.every_steps=3",
        mode,
    ]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ckpts = run_dir / "checkpoints"
    deadline = time.monotonic() + TIMEOUT
    while not (checkpoint.complete_steps(ckpts) and list(ckpts.glob(".tmp-step_*"))):
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    partial = list(ckpts.glob(".tmp-step_*"))
    assert partial, "the kill should have come during a save"
    good = checkpoint.latest(ckpts)
    assert good is not None and checkpoint.is_complete(good)

    resumed = run_cli(
        "train", str(recipe), f"run_dir={run_dir}", *RUN, mode, "train.max_steps=12", "resume=auto", cwd=tmp_path
    )
    assert resumed.returncode == 0, resumed.stderr
    assert f"warning: ignoring {partial[0]}: an interrupted save left it incomplete" in resumed.stderr
    assert f"resumed from {good}" in resumed.stdout


def test_only_the_main_process_writes(tiny_recipe: Path, tmp_path: Path):
    # Rank 1 is given a run dir of its own: as it must write nothing, nothing may appear there.
    main_dir, other_dir = tmp_path / "main", tmp_path / "other"
    procs = _start_ranks(
        2,
        "train",
        str(tiny_recipe),
        "strategy.timeout_s=60",
        cwd=tmp_path,
        per_rank=[[f"run_dir={main_dir}"], [f"run_dir={other_dir}"]],
    )
    results = finish(procs, TIMEOUT)
    assert [rc for rc, _, _ in results] == [0, 0], results
    assert not other_dir.exists()
    final = main_dir / "checkpoints" / "step_00000040"
    assert sorted(p.name for p in final.iterdir()) == [
        "model.safetensors",
        "optimizer.safetensors",
        "recipe.yaml",
        "rng.pt",
        "scheduler.pt",
        "trainer_state.json",
    ]
    assert len(torch.load(final / "rng.pt", weights_only=True)["ranks"]) == 2


PAYLOAD = """\
import os, pickle, sys

class Boom:
    def __reduce__(self):
        return (os.system, ("touch " + sys.argv[2],))

with open(sys.argv[1], "wb") as f:
    pickle.dump({"state": {}, "param_groups": [Boom()]}, f)
"""


def test_a_checkpoint_with_a_pickle_payload_is_refused_not_run(tiny_recipe: Path, tmp_path: Path):
    run_dir = tmp_path / "run"
    assert run_cli("train", str(tiny_recipe), f"run_dir={run_dir}", cwd=tmp_path).returncode == 0
    target = run_dir / "checkpoints" / "step_00000040" / "scheduler.pt"
    witness = tmp_path / "payload-ran"
    (tmp_path / "evil.py").write_text(PAYLOAD)
    subprocess.run([sys.executable, str(tmp_path / "evil.py"), str(target), str(witness)], check=True)
    reseal(target.parent)
    proc = run_cli("train", str(tiny_recipe), f"run_dir={run_dir}", "train.max_steps=50", "resume=auto", cwd=tmp_path)
    assert proc.returncode == 2
    assert not witness.exists()
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: resume: "), last
    assert "is not plain tensors; refusing to load it" in last


def test_resuming_with_another_model_shape_is_refused(tiny_recipe: Path, tmp_path: Path):
    run_dir = tmp_path / "run"
    assert run_cli("train", str(tiny_recipe), f"run_dir={run_dir}", cwd=tmp_path).returncode == 0
    proc = run_cli(
        "train",
        str(tiny_recipe),
        f"run_dir={run_dir}",
        "model.hidden_sizes=[64]",
        "train.max_steps=50",
        "resume=auto",
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert "holds a model of another shape than the recipe's" in last and "size mismatch" in last, proc.stderr


ELASTIC = {
    "ddp": [],
    "zero3": ["strategy.name=deepspeed", "strategy.deepspeed.zero_stage=3"],
}


@pytest.mark.parametrize(
    "strategy, resume_on",
    # More processes and fewer: each strategy's resharding path once (2 -> 1 and 2 -> 3 take the same one). FSDP's
    # (DCP) is tests/test_tensor_parallel.py's: a 2 x 2 mesh's checkpoint on 4 x 1, 1 x 4 and one process, exactly.
    [("ddp", 3), ("zero3", 1)],
)
def test_a_two_process_checkpoint_resumes_on_another_number_of_processes(
    tiny_recipe: Path, tmp_path: Path, resume_on: int, strategy: str
):
    run_dir = tmp_path / "run"
    first = ["train.max_steps=30", "checkpoint.every_steps=30", "logging.every_steps=1", "strategy.timeout_s=60"]
    first += ELASTIC[strategy]
    procs = _start_ranks(2, "train", str(tiny_recipe), f"run_dir={run_dir}", *first, cwd=tmp_path)
    assert [rc for rc, _, _ in finish(procs, TIMEOUT)] == [0, 0]
    ckpt = run_dir / "checkpoints" / "step_00000030"
    written = tmp_path / "written.safetensors"
    assert run_cli("ckpt", "export", str(ckpt), "--out", str(written)).returncode == 0

    # Resumed on M processes and saved again at once (in a copy of the run), the model is the one the N processes
    # wrote, exactly.
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    again = ["train.max_steps=30", "logging.every_steps=1", "strategy.timeout_s=60", "resume=auto"]
    procs = _start_ranks(
        resume_on, "train", str(tiny_recipe), f"run_dir={copy}", *again, *ELASTIC[strategy], cwd=tmp_path
    )
    assert [rc for rc, _, _ in finish(procs, TIMEOUT)] == [0] * resume_on
    resaved = copy / "checkpoints" / "step_00000030"
    assert state_world(resaved) == resume_on
    reread = tmp_path / "reread.safetensors"
    assert run_cli("ckpt", "export", str(resaved), "--out", str(reread)).returncode == 0
    a, b = load_file(str(written)), load_file(str(reread))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)

    then = ["train.max_steps=45", "logging.every_steps=1", "strategy.timeout_s=60", "resume=auto", *ELASTIC[strategy]]
    procs = _start_ranks(resume_on, "train", str(tiny_recipe), f"run_dir={run_dir}", *then, cwd=tmp_path)
    results = finish(procs, TIMEOUT)
    assert [rc for rc, _, _ in results] == [0] * resume_on, results
    out = results[0][1]
    assert "resumed from" in out and f"written by 2 processes, resumed by {resume_on}" in out
    # The model and optimizer continue exactly, so the loss goes on from where it was instead of starting over;
    # batches differ in size and content after the change, hence the tolerance (documented in docs/multi-process.md).
    curve = losses(run_dir)
    assert sorted(curve) == list(range(1, 46))
    before = sum(curve[s] for s in range(26, 31)) / 5
    after = sum(curve[s] for s in range(31, 36)) / 5
    assert abs(after - before) < 0.15 and after < curve[1] - 0.1
    assert state_world(run_dir / "checkpoints" / "step_00000045") == resume_on


def state_world(path: Path) -> int:
    import json

    return json.loads((path / "trainer_state.json").read_text())["world_size"]


CHAR_RECIPE = """\
model: {_component_: gpt, n_layer: 1, n_head: 2, n_embd: 16, dropout: 0.1}
data:
  dataset: {_component_: char_text, path: text.txt, block_size: 16, offsets: random}
  num_workers: 1
optimizer: {_component_: adamw, lr: 0.003}
train: {batch_size: 16, seed: 5}
eval: {every_steps: null, every_epoch: false}
checkpoint: {every_steps: 100}
logging: {every_steps: 1, trackers: [jsonl], progress_bar: false}
"""


def test_random_offsets_resume_to_the_same_samples_across_an_epoch_boundary(tmp_path: Path):
    # Two processes, 3600 train characters: 224 blocks, 7 updates an epoch. Stopped at 10 (inside epoch 1), the
    # resumed run skips into epoch 1 at the same offset and moves on to epoch 2's. A set not told the epoch (with
    # two processes the shuffling sampler takes it, and accelerate passes it no further) or a worker that kept its
    # copy of the set from an earlier epoch would read other samples than the uninterrupted run.
    (tmp_path / "text.txt").write_text("".join(chr(97 + (i * i + i // 7) % 26) for i in range(4000)))
    (tmp_path / "r.yaml").write_text(CHAR_RECIPE)
    full, parts = tmp_path / "full", tmp_path / "parts"

    def train(run_dir: Path, *overrides: str) -> list[tuple[int, str, str]]:
        procs = _start_ranks(
            2, "train", "r.yaml", f"run_dir={run_dir}", "strategy.timeout_s=60", *overrides, cwd=tmp_path
        )
        results = finish(procs, TIMEOUT)
        assert [rc for rc, _, _ in results] == [0, 0], results
        return results

    train(full, "train.max_steps=20")
    train(parts, "train.max_steps=10")
    assert "step_00000010" in train(parts, "train.max_steps=20", "resume=auto")[0][1]
    full_losses, part_losses = losses(full), losses(parts)
    assert sorted(part_losses) == list(range(1, 21))
    assert all(part_losses[s] == full_losses[s] for s in range(11, 21))  # bitwise
