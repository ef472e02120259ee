"""Shared helpers: the CLI in a subprocess (as users run it), with a timeout so a hang fails fast, or, for what it
refuses, in this process."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"


def run_cli(
    *args: str,
    cwd: Path | str = REPO,
    timeout: float = 300,
    launcher: list[str] | None = None,
    env: dict[str, str] | None = None,
):
    """Run `python -m launcher ARGS` (or LAUNCHER + ARGS), with `env` added to the environment, and return the
    finished process."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    cmd = (launcher or [sys.executable, "-m", "launcher"]) + list(args)
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def reseal(checkpoint_dir: Path) -> None:
    """Record a checkpoint's files anew in its manifest, as whoever tampered with a file can: a test of what the
    loaders refuse then reaches them past the checksums (which catch accidents, not attackers)."""
    from launcher.checkpoint import integrity

    state_file = checkpoint_dir / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state[integrity.MANIFEST_KEY] = integrity.manifest(checkpoint_dir)
    state_file.write_text(json.dumps(state))


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ranks(
    n: int, *args: str, cwd: Path, env: dict[str, str] | None = None, per_rank: list[list[str]] | None = None
) -> list[subprocess.Popen]:
    """N processes of `python -m launcher ARGS` (plus `per_rank[rank]`), each given its rank the way torchrun or
    srun would (no agent that would kill the others when one dies), meeting on 127.0.0.1."""
    port = free_port()
    procs = []
    for rank in range(n):
        rank_env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": "1",
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(n),
            "LOCAL_WORLD_SIZE": str(n),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            **(env or {}),
        }
        cmd = [sys.executable, "-m", "launcher", *args, *(per_rank[rank] if per_rank else [])]
        procs.append(
            subprocess.Popen(cmd, cwd=cwd, env=rank_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    return procs


def finish(procs: list[subprocess.Popen], timeout: float) -> list[tuple[int, str, str]]:
    """(exit code, stdout, stderr) of each process; kills them all if they outlast `timeout` seconds in all.

    Every process's pipes are drained at once (one thread each): a rank blocked on a full stderr pipe while the
    test reads another rank's would look like a hang of the launcher."""
    outputs: dict[int, tuple[str, str]] = {}

    def drain(i: int, p: subprocess.Popen) -> None:
        outputs[i] = p.communicate()

    threads = [threading.Thread(target=drain, args=(i, p), daemon=True) for i, p in enumerate(procs)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(deadline - time.monotonic(), 0))
    if any(t.is_alive() for t in threads):
        stacks = [_stack(p) for p in procs if p.poll() is None]
        for p in procs:
            p.kill()
        for t in threads:
            t.join()
        raise AssertionError(f"processes still running after {timeout} s: {outputs}\n{stacks}")
    return [(p.returncode, *outputs[i]) for i, p in enumerate(procs)]


def _stack(proc: subprocess.Popen) -> str:
    """Where a stuck process is, when py-spy is installed (it helps; it is not required)."""
    spy = shutil.which("py-spy")
    if not spy:
        return ""
    return subprocess.run([spy, "dump", "--pid", str(proc.pid)], capture_output=True, text=True, check=False).stdout


def cli_in_process(args: list[str], cwd: Path) -> tuple[int, str, str]:
    """`launcher ARGS` in this process, in `cwd`: its exit code, stdout and stderr. For refusals, which come before
    torch or Accelerate is set up: milliseconds where a subprocess takes seconds."""
    from launcher import cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.chdir(cwd), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(args)
    return code, out.getvalue(), err.getvalue()


BOTH_VERBS = (("validate",), ("train",))


def refused_alike(
    recipe: Path, *overrides: str, work: Path, verbs: tuple[tuple[str, ...], ...] = BOTH_VERBS
) -> list[str]:
    """Each verb (`validate`, `train`, `slurm submit --dry-run`) on the same recipe and overrides exits 2 with the
    same `error: <recipe>: ...` lines, no traceback, and writes nothing (its run dir would be inside its own empty
    folder under `work`); returns those lines."""
    said: dict[tuple[str, ...], list[str]] = {}
    for verb in verbs:
        folder = work / "-".join(verb)
        folder.mkdir(parents=True)
        code, out, err = cli_in_process([*verb, str(recipe), *overrides, f"run_dir={folder / 'run'}"], folder)
        shown = f"{' '.join(verb)}: exit {code}\nstdout:\n{out}\nstderr:\n{err}"
        assert code == 2 and "Traceback" not in out + err, shown
        assert err and all(line.startswith(f"error: {recipe}: ") for line in err.splitlines()), shown
        assert list(folder.iterdir()) == [], shown
        said[verb] = err.splitlines()
    first = said[verbs[0]]
    assert all(lines == first for lines in said.values()), said
    return [line.removeprefix(f"error: {recipe}: ") for line in first]


# An MLP that fails at its FAULT_AT-th training forward on rank FAULT_RANK (every attempt, or with ONCE=1 only the
# first): SIGKILL, an exception, or a refusal. It counts its forwards in a buffer, which a resumed run restores.
FAULTY = """
import os, signal
import torch
from launcher.errors import RecipeError


class Faulty(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        if self.training:
            self.calls += 1
            fault, at = os.environ.get("FAULT", ""), int(os.environ.get("FAULT_AT", "0"))
            again = os.environ.get("ONCE") == "1" and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0"
            here = os.environ.get("RANK", "0") == os.environ.get("FAULT_RANK", "1")
            if fault and not again and here and int(self.calls) == at:
                if fault == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                if fault == "raise":
                    raise RuntimeError(f"boom at call {at}")
                raise RecipeError("model: refused on this rank")
        return self.net(x)
"""


@pytest.fixture
def faulty(tmp_path: Path) -> Path:
    (tmp_path / "faulty.py").write_text(FAULTY)
    recipe = tmp_path / "faulty.yaml"
    recipe.write_text(TINY_RECIPE.replace("{_component_: mlp, hidden_sizes: [32]}", "{_component_: faulty.Faulty}"))
    return recipe
