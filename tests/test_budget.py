"""An epoch budget survives a change of world size: a run resumed on another number of processes keeps its
learning rate continuous, follows the same schedule over the epochs, and ends at the recipe's epoch count."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from conftest import TINY_RECIPE, finish, read_metrics, start_ranks
from test_distributed import TIMEOUT

from launcher import checkpoint, plan

EPOCHS = 4
RUN = [
    "train.max_steps=null",
    f"train.max_epochs={EPOCHS}",
    "scheduler._component_=cosine",
    "scheduler.warmup_steps=2",
    "eval.every_steps=null",
    "eval.every_epoch=false",
    "checkpoint.every_steps=5",
    "checkpoint.keep_last=50",
    "logging.every_steps=1",
    "strategy.timeout_s=60",
]
RESUME_STEP = 15  # with 2 processes: 8 updates per epoch, so mid-epoch (epoch 1, 7 of 8 batches done)


# ---------------------------------------------------------------------------------------------------- pure


SAVED = {"step": 15, "epoch": 1, "schedule_total": 32, "schedule_batch": 64, "schedule_position": 15.0}


def test_a_new_run_and_a_resume_on_the_same_world_count_updates_one_to_one():
    assert not plan.budget(8, 1, 64, None, EPOCHS).remapped
    same = plan.budget(8, 1, 64, None, EPOCHS, {**SAVED, "batches_done": 7})
    assert (same.total_steps, same.remapped) == (32, False)
    assert [same.position(s) for s in (15, 16, 32)] == [15, 16, 32]


def test_fewer_processes_take_more_smaller_updates_over_the_same_schedule():
    one = plan.budget(16, 1, 32, None, EPOCHS, {**SAVED, "batches_done": 14})
    assert one.total_steps == 15 + 2 + 2 * 16
    assert [one.position(s) for s in (15, 16, 17, 33, 49)] == [15, 15.5, 16, 24, 32]


def test_more_processes_end_the_schedule_at_the_last_epoch_despite_padding():
    # 512 samples over 3 processes of 32: 6 batches of 96 (padded), 4 of them done after aligning down to them.
    three = plan.budget(6, 1, 96, None, EPOCHS, {**SAVED, "batches_done": 4})
    assert three.total_steps == 15 + 2 + 2 * 6
    assert three.position(17) == 16  # the end of epoch 1, where it was in the planned schedule
    assert three.position(three.total_steps) == pytest.approx(32)


def test_max_steps_budgets_count_updates_whatever_the_world_size():
    b = plan.budget(16, 1, 32, 30, EPOCHS, {**SAVED, "batches_done": 14, "schedule_batch": 0})
    assert (b.total_steps, b.remapped) == (30, False)


# ---------------------------------------------------------------------------------------------------- real runs


def _rows(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(run_dir) if "lr" in r}


@pytest.fixture(scope="module", params=["ddp", "fsdp"])
def two_process_run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    root = tmp_path_factory.mktemp(f"budget-{request.param}")
    (root / "r.yaml").write_text(TINY_RECIPE)
    full = root / "full"
    procs = start_ranks(2, "train", "r.yaml", f"run_dir={full}", *RUN, f"strategy.name={request.param}", cwd=root)
    assert [rc for rc, _, _ in finish(procs, TIMEOUT)] == [0, 0]
    return request.param, full


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 3])  # fewer and more processes; the same number is every exact resume's test
def test_resuming_an_epoch_budget_on_another_world_size_keeps_the_schedule(
    two_process_run: tuple[str, Path], world: int, tmp_path: Path
):
    strategy, full = two_process_run
    (tmp_path / "r.yaml").write_text(TINY_RECIPE)
    ckpt = full / "checkpoints" / checkpoint.step_dir_name(RESUME_STEP)
    resumed = tmp_path / "resumed"
    procs = start_ranks(
        world,
        "train",
        "r.yaml",
        f"run_dir={resumed}",
        *RUN,
        f"strategy.name={strategy}",
        f"resume={ckpt}",
        cwd=tmp_path,
    )
    results = finish(procs, TIMEOUT)
    assert [rc for rc, _, _ in results] == [0] * world, results
    before, after = _rows(full), _rows(resumed)
    steps = sorted(after)
    assert steps[0] == RESUME_STEP + 1

    # No jump larger than the schedule's own step, at the resume or after it.
    own_step = max(abs(before[s + 1]["lr"] - before[s]["lr"]) for s in range(1, max(before)))
    lrs = [before[RESUME_STEP]["lr"]] + [after[s]["lr"] for s in steps]
    assert max(abs(b - a) for a, b in itertools.pairwise(lrs)) <= own_step * (1 + 1e-9)

    # The same schedule over the epochs: each epoch's first update has the planned learning rate (a row logs the
    # rate its update used, so the row after the one that ends the epoch).
    for epoch in range(2, EPOCHS):
        planned = next(before[s + 1]["lr"] for s, r in before.items() if r["epoch"] == epoch)
        reached = next(after[s + 1]["lr"] for s, r in after.items() if r["epoch"] == pytest.approx(epoch))
        assert reached == pytest.approx(planned, rel=1e-9, abs=1e-12)

    # It ends at the recipe's epoch count, with as many updates as the remaining samples take at this world size.
    assert after[steps[-1]]["epoch"] == pytest.approx(EPOCHS)
    if world == 2:
        assert steps[-1] == max(before)
        assert all(after[s]["lr"] == before[s]["lr"] for s in steps)  # bitwise: nothing was remapped
    assert ("epoch budget is kept" in results[0][1]) == (world != 2)
