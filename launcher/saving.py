"""When and what the loop saves: the trainer state around the checkpoint writer, the replicas' checksums, and
retention after each save."""

from __future__ import annotations

from collections.abc import Callable

import torch
from accelerate import Accelerator

from launcher import checkpoint, consensus
from launcher.metrics import Throughput
from launcher.plan import Budget
from launcher.recipe import Recipe, dump
from launcher.storage import Store
from launcher.strategies import DDP, unwrap
from launcher.trackers import write_pending
from launcher.trainstate import LogWindow, TrainState


class Saver:
    """Saves the run's state at its current step; remembers the last step saved."""

    def __init__(
        self,
        accelerator: Accelerator,
        recipe: Recipe,
        strategy: DDP,
        model: torch.nn.Module,
        writer: checkpoint.Writer,
        budget: Budget,
        throughput: Throughput,
    ):
        self.accelerator, self.recipe, self.strategy, self.writer = accelerator, recipe, strategy, writer
        self.model = model
        self.budget, self.throughput = budget, throughput
        self.last_step = -1
        self.store = writer.store = Store(recipe.checkpoint_store) if recipe.checkpoint_store else None

    def where(self, step: int) -> str:
        """Where the checkpoint of `step` is (or would be): a storage URL or a folder."""
        return self.recipe.checkpoint_name(self.recipe.checkpoint_dir / checkpoint.step_dir_name(step))

    def latest(self) -> str | None:
        steps = self.store.complete_steps() if self.store else checkpoint.complete_steps(self.recipe.checkpoint_dir)
        return self.where(steps[-1]) if steps else None

    def due(self, step: int) -> bool:
        every = self.recipe.checkpoint.every_steps
        return bool(every) and step % every == 0 and self.last_step != step

    def due_at_end(self, step: int, stop_reason: str) -> bool:
        """A run that was asked to stop (preemption, wall time) saves whatever save_final says: resuming it is the
        point. After divergence the state saved is the last good one, since skipped updates changed nothing,
        unless the strategy applied them inside backward."""
        asked_to_stop = stop_reason not in ("done", "early stopping")
        polluted = stop_reason == "diverged" and self.strategy.updates_in_backward
        return (self.recipe.checkpoint.save_final or asked_to_stop) and self.last_step != step and not polluted

    def save(self, state: TrainState, window: LogWindow, monitored: float | None, warn: Callable[[str], None]) -> None:
        ckpt, accelerator = self.recipe.checkpoint, self.accelerator
        with self.throughput.paused():
            # The replicas' checksums go with the checkpoint: proof, or a warning, that every rank holds one model.
            # (Sharded strategies hold different shards by design: nothing to compare.)
            model = unwrap(accelerator, self.model)
            checksums = [] if self.strategy.sharded else consensus.replica_checksums(accelerator, model)
            if len(set(checksums)) > 1 and accelerator.is_main_process:
                warn(f"warning: step {state.step}: the processes' parameters differ: {checksums}")
            monitor = {"name": ckpt.monitor, "mode": ckpt.mode, "value": monitored}
            state.schedule_position = float(self.budget.position(state.step))
            state.log_windows = window.gathered(accelerator)
            trainer_state = {
                **state.state_dict(),
                **self.strategy.layout(),
                "monitor": monitor,
                "replica_checksums": checksums,
            }
            best = [list(b) for b in state.best_checkpoints]
            store = self.store
            self.writer.save(
                self.recipe.checkpoint_dir / checkpoint.step_dir_name(state.step),
                trainer_state,
                dump(self.recipe),
                after=(lambda: store.prune(checkpoint.to_delete(store.complete_steps(), ckpt.keep_last, best)))
                if store
                else lambda: checkpoint.prune(self.recipe.checkpoint_dir, ckpt.keep_last, best),
            )
            self.last_step = state.step
            write_pending(accelerator.trackers)
