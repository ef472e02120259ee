"""`launcher plan`: what a recipe will do before it runs: batches, steps, epochs, the learning-rate curve.

The arithmetic is a pure function of the recipe, the train set's length and the number of processes, the same the
loop uses (Accelerate gives every process the same number of batches, padding the last one).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from launcher import schedules
from launcher.recipe import Recipe

SPARK = " ▁▂▃▄▅▆▇█"


@dataclass(frozen=True)
class Plan:
    processes: int
    global_batch: int
    batches_per_process: int  # per epoch
    steps_per_epoch: int
    total_steps: int
    epochs: float
    lr_points: list[tuple[int, float]] | None  # None where the scheduler is not a built-in one


def total_steps(steps_per_epoch: int, max_steps: int | None, max_epochs: int | None) -> int:
    """Optimizer updates in the run: the first of `max_steps` and `max_epochs` reached."""
    limits = [n for n in (max_steps, None if max_epochs is None else max_epochs * steps_per_epoch) if n is not None]
    return min(limits)


def make_plan(recipe: Recipe, train_samples: int, processes: int) -> Plan:
    t = recipe.train
    per_round = t.batch_size * processes
    batches = train_samples // per_round if recipe.data.drop_last else math.ceil(train_samples / per_round)
    steps_per_epoch = max(math.ceil(batches / t.gradient_accumulation_steps), 1)
    total = total_steps(steps_per_epoch, t.max_steps, t.max_epochs)
    lr_points = None
    spec = recipe.scheduler
    if spec.short_name in schedules.SCHEDULES:
        factor = schedules.build(spec.short_name, total, **dict(spec.kwargs))
        base = float(recipe.optimizer.kwargs.get("lr", 1e-3))
        marks = sorted({0, int(spec.kwargs.get("warmup_steps", 0)), total // 4, total // 2, 3 * total // 4, total - 1})
        lr_points = [(step, base * factor(step)) for step in marks if 0 <= step < total]
    return Plan(
        processes=processes,
        global_batch=per_round * t.gradient_accumulation_steps,
        batches_per_process=batches,
        steps_per_epoch=steps_per_epoch,
        total_steps=total,
        epochs=total / steps_per_epoch,
        lr_points=lr_points,
    )


def lr_curve(recipe: Recipe, total_steps: int, width: int = 60) -> str:
    """The schedule as one line of block characters, highest learning rate full height."""
    spec = recipe.scheduler
    factor = schedules.build(spec.short_name or "constant", total_steps, **dict(spec.kwargs))
    values = [factor(int(i * (total_steps - 1) / max(width - 1, 1))) for i in range(width)]
    top = max(values) or 1.0
    return "".join(SPARK[round(v / top * (len(SPARK) - 1))] for v in values)


def describe_plan(recipe: Recipe, plan: Plan, train_samples: int) -> str:
    t = recipe.train
    lines = [
        f"recipe        {recipe.name} (run dir {recipe.run_dir})",
        f"processes     {plan.processes}",
        f"batch         {t.batch_size} per process x {plan.processes} processes x "
        f"{t.gradient_accumulation_steps} accumulated = {plan.global_batch} samples per update",
        f"train set     {train_samples} samples: {plan.batches_per_process} batches per process per epoch, "
        f"{plan.steps_per_epoch} updates per epoch",
        f"run           {plan.total_steps} updates = {plan.epochs:.2f} epochs",
    ]
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
    if plan.lr_points is not None:
        points = ", ".join(f"{lr:.3g} at {step}" for step, lr in plan.lr_points)
        lines.append(f"learning rate {recipe.scheduler.target}: {points}")
        lines.append(f"              {lr_curve(recipe, plan.total_steps)}")
    else:
        lines.append(f"learning rate {recipe.scheduler.target} (not a built-in schedule: not drawn)")
    return "\n".join(lines)
