"""The skip of a non-finite update decided on the device (a fused optimizer reads the flag; the host reads the
flags only at log, evaluation and save steps, where the run may stop, and about once a second) keeps every
promise of the host's per-step verdict: the same update skipped on every rank, the same counters, rows, warning,
divergence and checkpoints. On the CPU `optimizer.fused: true` opts in (on CUDA it is the default)."""

from __future__ import annotations

import contextlib
import math
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import TINY_RECIPE, finish, read_metrics, run_cli
from safetensors.torch import load_file
from test_distributed import TIMEOUT
from test_resume import LOGGED, losses
from test_resume import start_ranks as resume_ranks
from test_semantics import INF_LOSS, assert_diverged_at_step_8, nan_recipe, start_ranks, state_at
from tqdm import tqdm

from launcher import build, checkpoint
from launcher.consensus import LostPeers, StepAgreement, StopRequests
from launcher.metrics import Throughput
from launcher.strategies.stepping import Stepper
from launcher.trainstate import LogWindow, TrainState
from launcher.updates import Updates

FUSED = "optimizer.fused=true"


# ------------------------------------------------------------------------------------ one process, in this process


def fake_accelerator(device: str = "cpu", scaler: object = None) -> SimpleNamespace:
    """What `Updates`, `Stepper` and `StepAgreement` ask of an Accelerator, for one process."""
    return SimpleNamespace(
        num_processes=1,
        process_index=0,
        is_main_process=True,
        scaler=scaler,
        device=torch.device(device),
        sync_gradients=True,
        gradient_accumulation_steps=1,
        unwrap_model=lambda model: model,
    )


def make_updates(optimizer: Callable, max_nonfinite_steps: int = 3, scaler: object = None) -> Updates:
    torch.manual_seed(0)
    accelerator = fake_accelerator(scaler=scaler)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    opt = optimizer(model.parameters())
    stepper = Stepper(accelerator, model, SimpleNamespace(optimizer=opt), direct=True)
    parts = build.Parts(model, torch.nn.CrossEntropyLoss(), opt, None, None, stepper)  # type: ignore[arg-type]
    agreement = StepAgreement(accelerator, False, StopRequests(), LostPeers(accelerator, 60.0))  # type: ignore[arg-type]
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    return Updates(
        accelerator, parts, scheduler, agreement, TrainState(), LogWindow(), tqdm(disable=True), Throughput(),  # type: ignore[arg-type]
        max_nonfinite_steps, None,
    )  # fmt: skip


def batches(pattern: str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One batch per character: `.` finite, `x` with a NaN input (the loss and gradients not finite)."""
    g = torch.Generator().manual_seed(1)
    for c in pattern:
        x, y = torch.randn(6, 4, generator=g), torch.randint(0, 3, (6,), generator=g)
        yield (x * math.nan if c == "x" else x), y


@contextlib.contextmanager
def no_host_reads() -> Iterator[None]:
    """A tensor's value read on the host (what would synchronise with a GPU) raises."""
    names = ("item", "tolist", "__bool__", "__float__", "__int__")
    saved = {name: getattr(torch.Tensor, name) for name in names}

    def refuse(*args, **kwargs):
        raise AssertionError("a host read of a tensor during the step")

    for name in names:
        setattr(torch.Tensor, name, refuse)
    try:
        yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


def train(updates: Updates, pattern: str, guard: bool) -> None:
    for x, y in batches(pattern):
        with no_host_reads() if guard else contextlib.nullcontext():
            assert updates.micro_step(x, y)
            updates.update()


def fused_adam(params):
    return torch.optim.Adam(params, lr=0.01, fused=True)


def test_a_fused_optimizer_skips_on_the_device_and_the_host_counts_at_the_read_as_at_each_update():
    pattern = "..x.xx..."
    device = make_updates(fused_adam)
    host = make_updates(fused_adam)
    host.parts.stepper.fused_skip = False  # the same optimizer, skipped by the host's verdict at each update
    device.agreement.reads.agreed(0, 1000)  # the next read of the skips: after these updates
    train(device, pattern, guard=True)  # not one host read during the steps
    train(host, pattern, guard=False)
    assert len(device.pending) == len(pattern) and device.state.skipped_steps == 0
    device.read_skips()
    assert device.pending == []
    for a, b in ((device, host), (host, device)):
        assert a.state.state_dict() == b.state.state_dict()
        assert a.state.skipped_steps == 3 and a.state.nonfinite_streak == 0
    # The parameters and the optimizer's state, step counts included, are the host path's bit for bit.
    for p, q in zip(device.parts.model.parameters(), host.parts.model.parameters(), strict=True):
        assert torch.equal(p, q)
    d_state, h_state = device.parts.optimizer.state_dict()["state"], host.parts.optimizer.state_dict()["state"]
    assert d_state.keys() == h_state.keys()
    for k in d_state:
        assert all(torch.equal(d_state[k][n], h_state[k][n]) for n in ("step", "exp_avg", "exp_avg_sq"))
        assert d_state[k]["step"].item() == pattern.count(".")
    # The loss window holds the applied updates' losses alone, as on the host path.
    assert device.window.batches == host.window.batches == pattern.count(".")
    assert [t.item() for t in device.window.losses] == [t.item() for t in host.window.losses]


def test_a_streak_that_reached_the_limit_between_two_reads_stops_the_run_at_the_read():
    updates = make_updates(fused_adam, max_nonfinite_steps=2)
    updates.agreement.reads.agreed(0, 1000)
    train(updates, ".xx..", guard=True)
    assert not updates.diverged  # not known yet
    updates.read_skips()
    assert updates.diverged and updates.diverged_streak == 2
    assert updates.state.nonfinite_streak == 0 and updates.state.skipped_steps == 2


def test_one_process_reads_the_skips_about_once_a_second_not_at_every_update(monkeypatch):
    now = [0.0]
    monkeypatch.setattr("launcher.consensus.time.monotonic", lambda: now[0])
    updates = make_updates(fused_adam)
    reads = []
    for x, y in batches("." * 250):
        updates.micro_step(x, y)
        reads.append(updates.update().read_skips)
        now[0] += 1 / 64  # an update takes 1/64 s
    # The first read, the one that measures the pace, then one a second (64 updates).
    assert [i for i, read in enumerate(reads) if read] == [0, 1, 65, 129, 193]


class MyAdam(torch.optim.Adam):
    pass


@pytest.mark.parametrize(
    ("optimizer", "on_device"),
    [
        (lambda p: torch.optim.Adam(p, fused=True), True),
        (lambda p: torch.optim.AdamW(p, fused=True), True),
        (lambda p: torch.optim.SGD(p, lr=0.1, fused=True), True),
        (lambda p: torch.optim.Adam(p), False),  # not fused: the host's verdict, as before
        (lambda p: torch.optim.AdamW(p, foreach=True), False),
        (lambda p: torch.optim.Adagrad(p, fused=True), False),  # counts a skipped step on some torch versions
        (lambda p: MyAdam(p, fused=True), False),  # a subclass may not read the flag
    ],
)
def test_which_optimizers_skip_on_the_device(optimizer, on_device: bool):
    updates = make_updates(optimizer)
    train(updates, ".", guard=False)
    assert updates.parts.stepper.skips_on_device() is on_device


def test_fp16s_loss_scaler_keeps_the_hosts_verdict():
    assert make_updates(fused_adam, scaler=object()).parts.stepper.skips_on_device() is False


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step")
def test_fused_sgd_with_momentum_waits_for_its_momentum_buffers():
    # A skipped first step would leave torch's fused SGD with momentum buffers made but never filled.
    updates = make_updates(lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, fused=True))
    stepper = updates.parts.stepper
    on_device = []
    for x, y in batches("x.x."):
        updates.micro_step(x, y)
        on_device.append(stepper.skips_on_device())
        updates.update()
    assert on_device == [False, False, True, True]
    updates.read_skips()
    assert updates.state.skipped_steps == 2
    buffers = [updates.parts.optimizer.state[p]["momentum_buffer"] for p in updates.parts.model.parameters()]
    assert all(torch.isfinite(b).all() for b in buffers)


def test_a_fused_optimizer_resuming_an_unfused_checkpoint_steps_unfused_and_fp16s_scaler_accepts_it():
    # torch keeps the checkpoint's param groups (unfused) but its amp attribute says fused, from the build: GradScaler
    # would hand the unfused step flags it refuses. Made to agree after the load.
    from launcher.strategies.stepping import match_fused

    model = torch.nn.Linear(4, 2)
    unfused = torch.optim.Adam(model.parameters())
    model(torch.randn(3, 4)).sum().backward()
    unfused.step()
    fused = torch.optim.Adam(model.parameters(), fused=True)
    fused.load_state_dict(unfused.state_dict())
    match_fused(fused)
    scaler = torch.amp.GradScaler("cpu")
    model.zero_grad()
    scaler.scale(model(torch.randn(3, 4)).sum()).backward()
    scaler.unscale_(fused)
    scaler.step(fused)  # without match_fused: AssertionError (Expected grad_scale and found_inf to be None)
    scaler.update()
    assert fused.param_groups[0]["fused"] is None
    refused = torch.optim.Adam(model.parameters(), fused=True)
    refused.load_state_dict(torch.optim.Adam(model.parameters(), fused=True).state_dict())
    match_fused(refused)
    assert refused._step_supports_amp_scaling is True


def recipe_for(tmp_path: Path, *overrides: str):
    from launcher.recipe import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text(TINY_RECIPE)
    return load_recipe(path, [f"run_dir={tmp_path / 'run'}", *overrides])


def test_fused_is_the_default_for_optimizers_with_a_fused_kernel(tmp_path: Path):
    from launcher import strategies

    cuda, cpu, mps = fake_accelerator("cuda"), fake_accelerator("cpu"), fake_accelerator("mps")

    def default(*overrides: str, accelerator=cuda, strategy=None) -> dict:
        recipe = recipe_for(tmp_path, *overrides)
        return build.fused_default(recipe, strategy or strategies.choose(recipe, 1), accelerator)

    assert default() == {"fused": True}  # adam
    assert default("optimizer._component_=adamw") == default("optimizer._component_=torch.optim.SGD") == default()
    assert default(accelerator=cpu) == {"fused": True}  # one kernel instead of a dozen operations per parameter
    assert default(accelerator=mps) == {}
    # On the CPU the launcher's choice keeps the host's verdict at every update; a recipe's own `fused: true` (no
    # default then) and CUDA leave the skip to the optimizer on the device.
    assert build.host_verdict(default(accelerator=cpu), cpu) is True
    assert build.host_verdict(default(FUSED, accelerator=cpu), cpu) is False
    assert build.host_verdict(default(), cuda) is False
    assert default("optimizer.fused=false") == default("optimizer.foreach=true") == {}  # the recipe chose
    assert default("optimizer._component_=adagrad") == default("optimizer._component_=rmsprop") == {}
    engine = SimpleNamespace(updates_in_backward=True, offloaded=set)  # DeepSpeed steps inside its engine
    offload = SimpleNamespace(updates_in_backward=False, offloaded=lambda: {"parameters", "optimizer"})
    assert default(strategy=engine) == default(strategy=offload) == {}


# ------------------------------------------------------------------------------------- real runs, over gloo


def test_one_process_skips_an_update_with_a_nonfinite_loss_on_the_device(tmp_path: Path):
    (tmp_path / "infloss.py").write_text(INF_LOSS)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(TINY_RECIPE + "loss: {_component_: infloss.InfAtCalls, first: 3, last: 4}\n")
    run = run_cli("train", str(recipe), f"run_dir={tmp_path / 'run'}", "train.max_steps=6", FUSED, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    skipped = {r["step"]: r["train/skipped_steps"] for r in read_metrics(tmp_path / "run") if "train/loss" in r}
    assert [skipped[s] for s in range(1, 7)] == [0, 0, 1, 2, 2, 2]
    assert "warning: step 3: update skipped" in run.stderr and run.stderr.count("update skipped") == 1


def weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "checkpoints" / checkpoint.step_dir_name(step) / "model.safetensors")


def optimizer_state(run_dir: Path, step: int) -> dict:
    return checkpoint.load_optimizer_state(run_dir / "checkpoints" / checkpoint.step_dir_name(step))["state"]


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_nan_on_one_rank_is_skipped_on_the_device_by_every_rank(tmp_path: Path):
    recipe = nan_recipe(tmp_path, first=5, last=5)
    run_dir = tmp_path / "run"
    procs = start_ranks(
        2, "train", str(recipe), f"run_dir={run_dir}", "train.max_steps=8", "checkpoint.every_steps=1",
        "checkpoint.keep_last=20", FUSED, cwd=tmp_path,
    )  # fmt: skip
    results = finish(procs, TIMEOUT)
    assert [rc for rc, _, _ in results] == [0, 0], results
    skipped = {r["step"]: r["train/skipped_steps"] for r in read_metrics(run_dir) if "train/loss" in r}
    assert [skipped[s] for s in range(1, 9)] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert results[0][2].count("warning: step 5: update skipped: the loss or gradient norm is not finite") == 1
    assert "update skipped" not in results[1][2]
    for step in range(1, 9):
        state = state_at(run_dir, step)
        assert len(set(state["replica_checksums"])) == 1, step
        expected = (0, 0) if step < 5 else (1, 1) if step == 5 else (1, 0)
        assert (state["skipped_steps"], state["nonfinite_streak"]) == expected, step
    # Step 5's update changed nothing: the parameters, the moments, the step count.
    assert same(weights(run_dir, 4), weights(run_dir, 5)) and not same(weights(run_dir, 5), weights(run_dir, 6))
    at4, at5, at6 = (optimizer_state(run_dir, s) for s in (4, 5, 6))
    for key in at4:
        assert all(torch.equal(at4[key][n], at5[key][n]) for n in ("step", "exp_avg", "exp_avg_sq"))
        assert (at5[key]["step"].item(), at6[key]["step"].item()) == (4, 5)


def test_skips_read_at_a_later_step_are_counted_and_logged_right(tmp_path: Path):
    recipe = nan_recipe(tmp_path, first=5, last=6)
    run_dir = tmp_path / "run"
    procs = start_ranks(
        2, "train", str(recipe), f"run_dir={run_dir}", "train.max_steps=12", "logging.every_steps=4",
        "checkpoint.every_steps=null", "eval.every_steps=null", FUSED, cwd=tmp_path,
    )  # fmt: skip
    results = finish(procs, TIMEOUT)
    assert [rc for rc, _, _ in results] == [0, 0], results
    rows = {r["step"]: r for r in read_metrics(run_dir) if "train/loss" in r}
    assert {s: r["train/skipped_steps"] for s, r in rows.items()} == {4: 0, 8: 2, 12: 2}
    assert all(math.isfinite(r["train/loss"]) for r in rows.values())
    assert "warning: step 5: update skipped" in results[0][2]
    state = state_at(run_dir, 12)
    assert (state["skipped_steps"], state["nonfinite_streak"]) == (2, 0)
    assert len(set(state["replica_checksums"])) == 1


def test_consecutive_nans_stop_at_the_same_step_as_the_host_path_when_every_step_logs(tmp_path: Path):
    recipe = nan_recipe(tmp_path, first=6, last=10_000)
    run_dir = tmp_path / "run"
    procs = start_ranks(
        2, "train", str(recipe), f"run_dir={run_dir}", "train.max_steps=100", "train.max_nonfinite_steps=3",
        "checkpoint.every_steps=5", FUSED, cwd=tmp_path,
    )  # fmt: skip
    assert_diverged_at_step_8(finish(procs, TIMEOUT))
    state = state_at(run_dir, 8)
    assert state["skipped_steps"] == 3 and state["nonfinite_streak"] == 3
    assert len(set(state["replica_checksums"])) == 1
    assert same(weights(run_dir, 5), weights(run_dir, 8))  # the last good state: after step 5


def test_a_streak_that_reached_the_limit_between_reads_stops_the_run_at_the_next_read(tmp_path: Path):
    # No log line until step 50: the streak (from step 6) is read at a save step (10) or at an agreement on
    # stopping before it, whichever comes first; the stop lands there, with the streak as long as it got.
    recipe = nan_recipe(tmp_path, first=6, last=10_000)
    run_dir = tmp_path / "run"
    procs = start_ranks(
        2, "train", str(recipe), f"run_dir={run_dir}", "train.max_steps=100", "train.max_nonfinite_steps=3",
        "checkpoint.every_steps=5", "logging.every_steps=50", "eval.every_steps=null", FUSED, cwd=tmp_path,
    )  # fmt: skip
    results = finish(procs, TIMEOUT)
    assert [rc for rc, _, _ in results] == [1, 1], results
    message = results[0][2].strip().splitlines()[-1]
    stop = int(message.split("error: stopped at step ")[1].split(":")[0])
    assert 8 <= stop <= 10, message
    assert message.startswith(
        f"error: stopped at step {stop}: {stop - 5} updates in a row had a non-finite loss or gradient norm"
    )
    assert checkpoint.step_dir_name(stop) in message
    state = state_at(run_dir, stop)
    assert state["skipped_steps"] == state["nonfinite_streak"] == stop - 5
    assert same(weights(run_dir, 5), weights(run_dir, stop))


def test_a_killed_run_skipping_on_the_device_resumes_bitwise(tmp_path: Path):
    # The log window crosses the checkpoints (a line every 7 steps, a save every 10): what a save holds of it, read
    # from the device at the save, is what the run that never stopped logs.
    recipe = tmp_path / "r.yaml"
    recipe.write_text(TINY_RECIPE)
    full, crashed = tmp_path / "full", tmp_path / "crashed"
    assert [rc for rc, _, _ in finish(resume_ranks(2, recipe, full, FUSED), TIMEOUT)] == [0, 0]
    procs = resume_ranks(2, recipe, crashed, FUSED)
    deadline = time.monotonic() + TIMEOUT
    while max(checkpoint.complete_steps(crashed / "checkpoints"), default=0) < 40:
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
        time.sleep(0.05)
    for p in procs:
        p.send_signal(signal.SIGKILL)
    for p in procs:
        p.wait()
    resumed_from = max(checkpoint.complete_steps(crashed / "checkpoints"))
    assert resumed_from < 120
    results = finish(resume_ranks(2, recipe, crashed, FUSED, "resume=auto"), TIMEOUT)
    assert [rc for rc, _, _ in results] == [0, 0], results
    full_losses, resumed_losses = losses(full), losses(crashed)
    assert sorted(resumed_losses) == LOGGED
    assert all(resumed_losses[s] == full_losses[s] for s in LOGGED)
    assert same(weights(full, 120), weights(crashed, 120))
