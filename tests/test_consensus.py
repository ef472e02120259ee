"""Launch guards and stop requests, without a process group."""

from __future__ import annotations

import math
import os
import signal
import time

import pytest
import torch

from launcher import guards
from launcher.consensus import STOP_REASONS, StopChecks, StopRequests, poison_nonfinite, steps_within


def test_a_clean_launch_has_no_problems():
    env = {"WORLD_SIZE": "2", "LOCAL_RANK": "0", "ACCELERATE_MIXED_PRECISION": "no"}
    assert guards.launch_problems(env, "bf16", "ddp", 4) == []  # launch defaults leave the recipe in charge
    assert guards.launch_problems({}, "no", "ddp", 1) == []


def test_launch_flags_that_contradict_the_recipe_name_both_values():
    env = {
        "ACCELERATE_MIXED_PRECISION": "fp16",
        "ACCELERATE_USE_FSDP": "true",
        "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "8",
    }
    problems = guards.launch_problems(env, "bf16", "ddp", 2)
    assert problems == [
        "train.mixed_precision: the recipe says bf16 but accelerate launch says fp16; "
        "drop --mixed_precision or make them agree",
        "strategy.name: the recipe says ddp but accelerate launch says fsdp (--use_fsdp); the recipe chooses the "
        "strategy, so drop the flag or set strategy.name",
        "train.gradient_accumulation_steps: the recipe says 2 but accelerate launch says 8; "
        "drop --gradient_accumulation_steps or make them agree",
    ]
    assert guards.launch_problems({"ACCELERATE_MIXED_PRECISION": "bf16"}, "bf16", "ddp", 1) == []


def test_a_world_without_local_rank_is_refused():
    (problem,) = guards.launch_problems({"WORLD_SIZE": "4"}, "no", "ddp", 1)
    assert problem.startswith("launch: WORLD_SIZE=4 is set but LOCAL_RANK is not")


def test_accelerate_falling_back_to_one_process_is_caught():
    env = {"WORLD_SIZE": "2", "LOCAL_RANK": "1"}
    assert guards.world_problem(env, 1, "DistributedType.NO").startswith(
        "launch: 2 processes were started (WORLD_SIZE=2) but Accelerate set up 1 (DistributedType.NO)"
    )
    assert guards.world_problem(env, 2, "DistributedType.NO") is not None
    assert guards.world_problem(env, 2, "DistributedType.MULTI_CPU") is None
    assert guards.world_problem({}, 1, "DistributedType.NO") is None


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT])
def test_a_signal_is_only_recorded(sig):
    requests = StopRequests()
    requests.install()
    try:
        assert not requests.requested()
        os.kill(os.getpid(), sig)
        assert requests.requested() and requests.reason == signal.Signals(sig).name
        assert STOP_REASONS[requests.code()] == signal.Signals(sig).name
    finally:
        requests.uninstall()
    assert signal.getsignal(sig) is not requests._record


def test_a_second_ctrl_c_interrupts_at_once():
    requests = StopRequests()
    requests.install()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        requests.uninstall()


def test_the_wall_time_budget_becomes_a_stop_request():
    requests = StopRequests(max_time_s=0.05)
    assert not requests.requested()
    time.sleep(0.06)
    assert requests.requested() and requests.reason == "max_time_s reached"


def test_ranks_agree_on_stopping_about_once_a_second_whatever_the_pace():
    assert steps_within(1.0, 0.001) == 1000  # a fast loop: every 1000 steps
    assert steps_within(1.0, 0.25) == 4
    assert steps_within(1.0, 30.0) == 1  # slow steps: at every one
    assert steps_within(0.0, 0.001) == 1  # one process (or fp16): at every step
    assert steps_within(0.0, 0.0) == 1  # ... also if the clock did not move between two steps
    assert steps_within(1.0, 1e-6) == 1000  # never fewer checks than one per 1000 steps


def test_stop_checks_fall_at_the_steps_agreed_on():
    checks = StopChecks(every_s=1.0)
    assert checks.due(0) and checks.proposal(0) == 1  # no pace known yet: agree again at the next step
    checks.agreed(0, 1)
    assert not checks.due(0) and checks.due(1)
    time.sleep(0.05)
    proposal = checks.proposal(1)  # one step took about 0.05 s
    assert 1 <= proposal <= 20  # (fewer if the machine stalled the sleep)
    checks.agreed(1, 7)  # another rank proposed fewer steps: that is what every rank uses
    assert [step for step in range(2, 12) if checks.due(step)] == [8, 9, 10, 11]


def test_a_nonfinite_loss_makes_every_gradient_nan_and_a_finite_one_changes_nothing():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    x = torch.randn(4, 3)
    model(x).pow(2).mean().backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    poison_nonfinite(model(x).pow(2).mean()).backward()
    assert all(torch.equal(a, p.grad) for a, p in zip(plain, model.parameters(), strict=True))  # bit for bit
    for bad in (math.nan, math.inf, -math.inf):
        model.zero_grad()
        poison_nonfinite(model(x).pow(2).mean() * 0 + bad).backward()  # the gradient alone would be finite (0)
        assert all(p.grad.isnan().all() for p in model.parameters()), bad
