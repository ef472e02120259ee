"""The learning-rate schedules as pure functions of the step, and against the torch schedulers they mirror."""

from __future__ import annotations

import functools
import itertools
import math

import pytest
import torch

from launcher import schedules
from launcher.schedules import build, constant, cosine, cyclic, exponential, linear, onecycle, step_decay, with_warmup

TOL = 1e-6  # relative to the largest learning rate of the run


def driven_lrs(make_scheduler, steps: int, lr: float = 1.0) -> list[float]:
    """The learning rate of each of `steps` updates, as an optimizer under `make_scheduler(optimizer)` sees it."""
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=lr)
    scheduler = make_scheduler(optimizer)
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def assert_close_lrs(actual: list[float], expected: list[float], max_lr: float) -> None:
    assert len(actual) == len(expected)
    for step, (a, e) in enumerate(zip(actual, expected, strict=True)):
        assert abs(a - e) <= TOL * max_lr, f"step {step}: {a} != {e}"


# ---------------------------------------------------------------------------------------------------- decays


@pytest.mark.parametrize("fn", [cosine, linear])
@pytest.mark.parametrize(("total", "min_ratio"), [(100, 0.0), (100, 0.1), (7, 0.5), (1, 0.0), (1000, 0.01)])
def test_decay_endpoints_and_monotonic(fn, total: int, min_ratio: float):
    values = [fn(step, total_steps=total, min_ratio=min_ratio) for step in range(total + 20)]
    assert values[0] == pytest.approx(1.0)
    assert values[total] == pytest.approx(min_ratio, abs=1e-12)
    assert all(b <= a + 1e-15 for a, b in itertools.pairwise(values)), "not monotonically non-increasing"
    assert all(v == pytest.approx(min_ratio, abs=1e-12) for v in values[total:]), "not flat after total_steps"
    assert all(min_ratio - 1e-12 <= v <= 1.0 + 1e-12 for v in values)


def test_cosine_shape():
    total, min_ratio = 100, 0.2
    assert cosine(total // 2, total_steps=total, min_ratio=min_ratio) == pytest.approx((1 + min_ratio) / 2)
    # A quarter of the way the cosine has fallen by (1 - cos 45°) / 2 of its range.
    quarter = cosine(total // 4, total_steps=total, min_ratio=min_ratio)
    assert quarter == pytest.approx(min_ratio + (1 - min_ratio) * (1 + math.cos(math.pi / 4)) / 2)


def test_linear_is_a_straight_line():
    total, min_ratio = 40, 0.25
    values = [linear(step, total_steps=total, min_ratio=min_ratio) for step in range(total + 1)]
    for a, b in itertools.pairwise(values):
        assert b - a == pytest.approx(-(1 - min_ratio) / total)


def test_constant():
    assert [constant(step, total_steps=10) for step in (0, 5, 10, 1000)] == [1.0] * 4


def test_step_decay():
    values = [step_decay(step, total_steps=100, step_size=10, gamma=0.5) for step in range(35)]
    assert values[:10] == [1.0] * 10
    assert values[10:20] == [0.5] * 10
    assert values[20:30] == [0.25] * 10
    assert values[30] == 0.125
    assert step_decay(9, total_steps=100, step_size=10) == 1.0
    assert step_decay(10, total_steps=100, step_size=10) == pytest.approx(0.1)  # default gamma


def test_step_decay_matches_torch_steplr():
    total, step_size, gamma, lr = 50, 7, 0.3, 0.1
    factor = build("step", total, step_size=step_size, gamma=gamma)
    ours = driven_lrs(lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, factor), total, lr)
    ref = driven_lrs(lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=step_size, gamma=gamma), total, lr)
    assert_close_lrs(ours, ref, lr)


def test_exponential():
    gamma = 0.9
    for step in (0, 1, 2, 10, 100):
        assert exponential(step, total_steps=100, gamma=gamma) == pytest.approx(gamma**step)
    values = [exponential(step, total_steps=1000) for step in range(1000)]
    assert values[0] == 1.0
    assert all(b < a for a, b in itertools.pairwise(values))
    assert values[-1] == pytest.approx(0.999**999)


def test_exponential_matches_torch_exponentiallr():
    total, gamma, lr = 60, 0.95, 0.01
    factor = build("exponential", total, gamma=gamma)
    ours = driven_lrs(lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, factor), total, lr)
    ref = driven_lrs(lambda opt: torch.optim.lr_scheduler.ExponentialLR(opt, gamma=gamma), total, lr)
    assert_close_lrs(ours, ref, lr)


# ---------------------------------------------------------------------------------------------------- warm-up


@pytest.mark.parametrize(("name", "kwargs"), [("cosine", {"min_ratio": 0.1}), ("linear", {}), ("constant", {})])
@pytest.mark.parametrize(("total", "warmup"), [(100, 10), (50, 1), (30, 29)])
def test_warmup_ramps_to_the_schedule_start_then_shifts_it(name: str, kwargs: dict, total: int, warmup: int):
    factor = build(name, total, warmup_steps=warmup, **kwargs)
    ramp = [factor(step) for step in range(warmup)]
    # A linear ramp from 1/(warmup+1), strictly below the start of the schedule...
    for step, value in enumerate(ramp):
        assert value == pytest.approx((step + 1) / (warmup + 1))
    assert all(b > a for a, b in itertools.pairwise(ramp))
    assert ramp[-1] < 1.0
    # ... which it reaches on the first step after the warm-up ...
    assert factor(warmup) == pytest.approx(1.0)
    # ... and then the schedule, started late and spanning the steps after the warm-up.
    decay = functools.partial(schedules.SCHEDULES[name], total_steps=total - warmup, **kwargs)
    for step in range(warmup, total + 5):
        assert factor(step) == pytest.approx(decay(step - warmup))
    assert factor(total) == pytest.approx(kwargs.get("min_ratio", 0.0) if name != "constant" else 1.0, abs=1e-12)


def test_warmup_reaches_a_schedule_start_below_one():
    start = 0.4

    def schedule(step: int) -> float:
        return start * 0.5**step

    values = [with_warmup(step, warmup_steps=3, schedule=schedule) for step in range(6)]
    assert values == pytest.approx([start / 4, start / 2, 3 * start / 4, start, start / 2, start / 4])


@pytest.mark.parametrize(("name", "kwargs"), [("cosine", {"min_ratio": 0.1}), ("linear", {}), ("constant", {})])
@pytest.mark.parametrize(("total", "warmup"), [(100, 10), (50, 1), (30, 29)])
def test_warmup_from_zero_starts_at_zero_and_reaches_the_start_at_update_warmup(
    name: str, kwargs: dict, total: int, warmup: int
):
    factor = build(name, total, warmup_steps=warmup, warmup_start="zero", **kwargs)
    # The first update (step 0) at 0, then equal steps of 1/warmup: the schedule's start at step `warmup`, the
    # update after the warm-up, as with the default start.
    assert factor(0) == 0.0
    for step in range(warmup + 1):
        assert factor(step) == pytest.approx(step / warmup)
    plain = build(name, total, warmup_steps=warmup, **kwargs)
    for step in range(warmup, total + 5):
        assert factor(step) == plain(step)


@pytest.mark.parametrize("name", ["cosine", "linear"])
def test_warmup_from_zero_is_the_hugging_face_trainers_schedule(name: str):
    transformers = pytest.importorskip("transformers")
    total, warmup, lr = 50, 7, 1e-3
    factor = build(name, total, warmup_steps=warmup, warmup_start="zero")
    theirs = getattr(transformers, f"get_{name}_schedule_with_warmup")
    ours = driven_lrs(lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, factor), total, lr)
    ref = driven_lrs(lambda opt: theirs(opt, num_warmup_steps=warmup, num_training_steps=total), total, lr)
    assert_close_lrs(ours, ref, lr)


def test_build_without_warmup_is_the_plain_schedule():
    factor = build("cosine", 80, min_ratio=0.3)
    for step in range(100):
        assert factor(step) == cosine(step, total_steps=80, min_ratio=0.3)


def test_build_with_warmup_drives_lambdalr():
    """The optimizer's lr under LambdaLR(build(...)) is base lr times the factor, step for step."""
    total, warmup, lr, min_ratio = 60, 8, 3e-4, 0.1
    factor = build("cosine", total, warmup_steps=warmup, min_ratio=min_ratio)
    lrs = driven_lrs(lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, factor), total + 1, lr)
    expected = []
    for step in range(total + 1):
        if step < warmup:
            expected.append(lr * (step + 1) / (warmup + 1))
        else:
            progress = (step - warmup) / (total - warmup)
            expected.append(lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))))
    assert_close_lrs(lrs, expected, lr)
    assert lrs[warmup] == pytest.approx(lr)
    assert lrs[total] == pytest.approx(lr * min_ratio)


def test_lambdalr_over_build_resumes_where_it_stopped():
    """A scheduler rebuilt from the recipe and loaded from a state dict continues the same learning rates."""
    total, warmup, lr, cut = 40, 5, 0.01, 17

    def make(optimizer):
        return torch.optim.lr_scheduler.LambdaLR(optimizer, build("linear", total, warmup_steps=warmup))

    whole = driven_lrs(make, total, lr)

    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=lr)
    scheduler = make(optimizer)
    for _ in range(cut):
        optimizer.step()
        scheduler.step()
    opt_state, sched_state = optimizer.state_dict(), scheduler.state_dict()

    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=lr)
    scheduler = make(optimizer)
    optimizer.load_state_dict(opt_state)
    scheduler.load_state_dict(sched_state)
    rest = []
    for _ in range(cut, total):
        rest.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert_close_lrs(rest, whole[cut:], lr)


# ---------------------------------------------------------------------------------------------------- cyclic


@pytest.mark.parametrize(
    ("up", "down", "base_ratio"), [(5, None, 0.1), (4, 7, 0.1), (3, 2, 0.25), (1, 1, 0.0), (10, None, 0.5)]
)
def test_cyclic_matches_torch_cycliclr_triangular(up: int, down: int | None, base_ratio: float):
    max_lr = 0.2
    cycle = up + (up if down is None else down)
    steps = 4 * cycle + 3  # a few whole cycles and part of another
    factor = build("cyclic", steps, step_size_up=up, step_size_down=down, base_ratio=base_ratio)
    ours = driven_lrs(lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, factor), steps, max_lr)
    ref = driven_lrs(
        lambda opt: torch.optim.lr_scheduler.CyclicLR(
            opt,
            base_lr=base_ratio * max_lr,
            max_lr=max_lr,
            step_size_up=up,
            step_size_down=down,
            mode="triangular",
            cycle_momentum=False,
        ),
        steps,
        max_lr,
    )
    assert_close_lrs(ours, ref, max_lr)


def test_cyclic_shape():
    values = [cyclic(step, total_steps=100, step_size_up=4, step_size_down=2, base_ratio=0.2) for step in range(13)]
    assert values == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0, 0.6, 0.2, 0.4, 0.6, 0.8, 1.0, 0.6, 0.2])


# ---------------------------------------------------------------------------------------------------- one-cycle


def torch_onecycle(total: int, pct_start: float, div_factor: float, final_div_factor: float, max_lr: float):
    return driven_lrs(
        lambda opt: torch.optim.lr_scheduler.OneCycleLR(
            opt,
            max_lr=max_lr,
            total_steps=total,
            pct_start=pct_start,
            div_factor=div_factor,
            final_div_factor=final_div_factor,
            anneal_strategy="cos",
            cycle_momentum=False,
            three_phase=False,
        ),
        total,
        max_lr,
    )


@pytest.mark.parametrize(
    ("total", "pct_start", "div_factor", "final_div_factor"),
    [
        (100, 0.3, 25.0, 1e4),
        (1000, 0.25, 25.0, 1e4),
        (37, 0.3, 10.0, 100.0),
        (10, 0.3, 25.0, 1e4),
        (7, 0.5, 25.0, 1e4),
        (20, 0.1, 25.0, 1e4),  # the rise is exactly one step
        (100, 0.02, 5.0, 10.0),
        (64, 0.9, 25.0, 1e4),
    ],
)
def test_onecycle_matches_torch_onecyclelr(total: int, pct_start: float, div_factor: float, final_div_factor: float):
    max_lr = 3e-3
    factor = build("onecycle", total, pct_start=pct_start, div_factor=div_factor, final_div_factor=final_div_factor)
    ours = driven_lrs(lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, factor), total, max_lr)
    ref = torch_onecycle(total, pct_start, div_factor, final_div_factor, max_lr)
    assert_close_lrs(ours, ref, max_lr)
    assert ours[0] == pytest.approx(max_lr / div_factor)
    assert ours[-1] == pytest.approx(max_lr / (div_factor * final_div_factor))
    assert max(ours) <= max_lr * (1 + 1e-12)  # reached exactly only where the rise ends on a whole step


@pytest.mark.parametrize(("total", "pct_start"), [(10, 0.15), (4, 0.3), (100, 0.015)])
def test_onecycle_matches_torch_with_a_rise_under_two_steps(total: int, pct_start: float):
    max_lr = 1.0
    factor = build("onecycle", total, pct_start=pct_start)
    ours = driven_lrs(lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, factor), total, max_lr)
    assert_close_lrs(ours, torch_onecycle(total, pct_start, 25.0, 1e4, max_lr), max_lr)


def test_onecycle_is_flat_after_the_run():
    low = 1 / (25.0 * 1e4)
    assert onecycle(99, total_steps=100) == pytest.approx(low)
    assert onecycle(150, total_steps=100) == pytest.approx(low)
