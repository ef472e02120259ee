"""`launcher plan`: what a recipe will do before it runs: batches, steps, epochs, the learning-rate curve.

The arithmetic is a pure function of the recipe, the train set's length and the number of processes, the same the
loop uses (Accelerate gives every process the same number of batches, padding the last one).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from launcher import param_groups, schedules, strategies
from launcher.errors import RecipeError
from launcher.recipe import Recipe

if TYPE_CHECKING:
    import torch

SPARK = " ▁▂▃▄▅▆▇█"


@dataclass(frozen=True)
class Plan:
    processes: int
    global_batch: int
    batches_per_process: int  # per epoch
    steps_per_epoch: int
    total_steps: int
    epochs: float
    # (update, the rate it uses), updates numbered as the logs number them (the first is 1); None where the
    # scheduler is not a built-in one.
    lr_points: list[tuple[int, float]] | None


def total_steps(steps_per_epoch: int, max_steps: int | None, max_epochs: int | None) -> int:
    """Optimizer updates in the run: the first of `max_steps` and `max_epochs` reached."""
    limits = [n for n in (max_steps, None if max_epochs is None else max_epochs * steps_per_epoch) if n is not None]
    return min(limits)


@dataclass(frozen=True)
class Budget:
    """How long a run is and where its learning-rate schedule stands.

    With an epoch budget the run's length is a number of samples, fixed at its start: the schedule spans the
    updates planned then (`schedule_total`, of `schedule_batch` samples each), an epoch being `schedule_total /
    max_epochs` of them. A run resumed on another number of processes moves through the schedule by the epochs it
    trains: from the resume point (`origin_*`) to the end of its epoch (`boundary_*`) evenly over the updates left
    in that epoch, then `rate` planned updates per update. So a change of world size changes neither the learning
    rate at the resume step nor where the run ends: the remaining samples simply take more, smaller updates (or
    fewer, larger ones). With `train.max_steps` the run counts updates (`schedule_batch` 0)."""

    total_steps: int  # updates in the run, at this world size
    schedule_total: int
    schedule_batch: int = 0
    origin_step: int = 0
    origin_position: float = 0.0
    boundary_step: int = 0
    boundary_position: float = 0.0
    rate: float = 1.0

    @property
    def remapped(self) -> bool:
        """Whether updates here move the schedule otherwise than one step each (a resume changed the batch)."""
        same_pace = self.boundary_position - self.origin_position == self.boundary_step - self.origin_step
        return not (self.rate == 1.0 and self.origin_position == self.origin_step and same_pace)

    def position(self, step: int) -> float:
        """The schedule's step for update `step`: `step` itself unless a resume changed the batch."""
        if not self.remapped:
            return step  # exactly as a run that never changed its world size
        if step <= self.boundary_step:
            span = self.boundary_step - self.origin_step
            share = (step - self.origin_step) / span if span else 1.0
            return self.origin_position + share * (self.boundary_position - self.origin_position)
        return self.boundary_position + (step - self.boundary_step) * self.rate


def budget(
    batches_per_epoch: int,
    accumulation: int,
    samples_per_update: int,
    max_steps: int | None,
    max_epochs: int | None,
    saved: dict | None = None,
) -> Budget:
    """The run's budget at this world size; `saved` is the trainer state of the checkpoint resumed from (its
    `step`, `epoch` and `batches_done` in that epoch at this world's batches, and the schedule it followed)."""
    steps_per_epoch = max(math.ceil(batches_per_epoch / accumulation), 1)
    planned = total_steps(steps_per_epoch, max_steps, max_epochs)
    by_samples = max_epochs is not None and planned == max_epochs * steps_per_epoch
    if not by_samples:
        return Budget(planned, planned)
    if not saved or not saved.get("schedule_batch") or max_epochs is None:
        return Budget(planned, planned, samples_per_update)  # a new run, or a checkpoint that kept no budget
    step, epoch, schedule_total = int(saved["step"]), int(saved["epoch"]), int(saved["schedule_total"])
    left_in_epoch = math.ceil(max(batches_per_epoch - int(saved["batches_done"]), 0) / accumulation)
    total = step + left_in_epoch + (max_epochs - epoch - 1) * steps_per_epoch
    epoch_span = schedule_total / max_epochs
    return Budget(
        total_steps=min(total, max_steps) if max_steps is not None else total,
        schedule_total=schedule_total,
        schedule_batch=int(saved["schedule_batch"]),
        origin_step=step,
        origin_position=float(saved.get("schedule_position", step)),
        boundary_step=step + left_in_epoch,
        boundary_position=(epoch + 1) * epoch_span,
        # Padding of the last batch differs between world sizes: it must not stretch the schedule.
        rate=epoch_span / steps_per_epoch,
    )


def make_plan(recipe: Recipe, train_samples: int | None, processes: int) -> Plan:
    """The plan; without the train set's length (`None`: its files are not there yet) only `train.max_steps`
    bounds the run, and the per-epoch figures are 0."""
    t = recipe.train
    per_round = t.batch_size * strategies.choose(recipe, processes).data_ranks
    if train_samples is None:
        if t.max_steps is None:
            raise RecipeError("train.max_steps: needed to plan a run whose train set is not there yet")
        batches, steps_per_epoch, total = 0, 0, t.max_steps
    else:
        batches = train_samples // per_round if recipe.data.drop_last else math.ceil(train_samples / per_round)
        steps_per_epoch = max(math.ceil(batches / t.gradient_accumulation_steps), 1)
        total = total_steps(steps_per_epoch, t.max_steps, t.max_epochs)
    lr_points = None
    spec = recipe.scheduler
    if spec.short_name in schedules.SCHEDULES:
        factor = schedules.build(spec.short_name, total, **dict(spec.kwargs))
        base = float(recipe.optimizer.kwargs.get("lr", 1e-3))
        # The schedule's steps count from 0: step s is update s + 1 (the first after the warm-up is warmup_steps + 1).
        marks = sorted({0, int(spec.kwargs.get("warmup_steps", 0)), total // 4, total // 2, 3 * total // 4, total - 1})
        lr_points = [(step + 1, base * factor(step)) for step in marks if 0 <= step < total]
    return Plan(
        processes=processes,
        global_batch=per_round * t.gradient_accumulation_steps,
        batches_per_process=batches,
        steps_per_epoch=steps_per_epoch,
        total_steps=total,
        epochs=total / steps_per_epoch if steps_per_epoch else math.nan,
        lr_points=lr_points,
    )


def lr_curve(recipe: Recipe, total_steps: int, width: int = 60) -> str:
    """The schedule as one line of block characters, highest learning rate full height."""
    spec = recipe.scheduler
    factor = schedules.build(spec.short_name or "constant", total_steps, **dict(spec.kwargs))
    values = [factor(int(i * (total_steps - 1) / max(width - 1, 1))) for i in range(width)]
    top = max(values) or 1.0
    return "".join(SPARK[round(v / top * (len(SPARK) - 1))] for v in values)


def describe_strategy(
    recipe: Recipe, processes: int, parameters: int | None, model: torch.nn.Module | None = None
) -> list[str]:
    """The strategy, an estimate of each process's share of the training state, and what else it shows (`model`:
    built on the meta device)."""
    slots = strategies.optimizer_slots(recipe.optimizer.target, recipe.optimizer.kwargs)
    return strategies.choose(recipe, processes).describe(parameters, slots, model)


def describe_groups(recipe: Recipe, model: torch.nn.Module | None) -> list[str]:
    """The optimizer's param groups over `model` (built on the meta device; None: it would not build there)."""
    if model is None:
        return ["param groups  not shown (the model does not build on the meta device)"]
    return param_groups.describe_groups(param_groups.groups_for(recipe.optimizer, model))


def describe_plan(
    recipe: Recipe,
    plan: Plan,
    train_samples: int | None,
    tokens_per_sample: int = 0,
    parameters: int | None = None,
    missing: str = "",
    groups: Sequence[str] = (),
    model: torch.nn.Module | None = None,
) -> str:
    t = recipe.train
    ranks = plan.global_batch // (t.batch_size * t.gradient_accumulation_steps)
    readers = (
        f"{ranks} data ranks (each a group of {plan.processes // ranks} processes reading one batch)"
        if ranks != plan.processes
        else f"{plan.processes} processes"
    )
    lines = [
        f"recipe        {recipe.name} (run dir {recipe.run_dir})",
        f"world size    {plan.processes} process{'es' if plan.processes != 1 else ''}",
        f"batch         {t.batch_size} per process x {readers} x "
        f"{t.gradient_accumulation_steps} accumulated = {plan.global_batch} samples per update",
        f"train set     {train_samples} samples: {plan.batches_per_process} batches per process per epoch, "
        f"{plan.steps_per_epoch} updates per epoch"
        if train_samples is not None
        else f"train set     not there yet ({missing}): epochs not computed",
        f"run           {plan.total_steps} updates = {plan.epochs:.2f} epochs"
        if train_samples is not None
        else f"run           {plan.total_steps} updates (train.max_steps)",
    ]
    if tokens_per_sample:
        lines.insert(
            3,
            f"tokens        {tokens_per_sample} per sample = {plan.global_batch * tokens_per_sample:,} per update, "
            f"{plan.global_batch * tokens_per_sample * plan.total_steps:,} in the run",
        )
    e = recipe.eval
    if recipe.data.val is not None and (e.every_steps or e.every_epoch):
        when = [f"every {e.every_steps} updates"] if e.every_steps else []
        when += ["at each epoch's end"] if e.every_epoch else []
        lines.append(f"evaluation    {' and '.join(when)}")
    c = recipe.checkpoint
    saves = f"every {c.every_steps} updates" if c.every_steps else "no periodic saves"
    lines.append(
        f"checkpoints   {saves}{', and at the end' if c.save_final else ''}; keep {c.keep_last} newest"
        f"{f' and {c.keep_best} best by {c.monitor}' if c.keep_best else ''}"
    )
    lines.extend(describe_strategy(recipe, plan.processes, parameters, model))
    lines.extend(groups)
    if plan.lr_points is not None:
        points = ", ".join(f"{lr:.3g} at {step}" for step, lr in plan.lr_points)
        lines.append(f"learning rate {recipe.scheduler.target}: {points}")
        lines.append(f"              {lr_curve(recipe, plan.total_steps)}")
    else:
        lines.append(f"learning rate {recipe.scheduler.target} (not a built-in schedule: not drawn)")
    return "\n".join(lines)
