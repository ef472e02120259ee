"""The training loop, top to bottom: start the processes, build, open the run dir, train, stop.

One loop for one CPU process, one GPU or many processes: the strategy (`launcher/strategies/`) places, shards and
steps the model; the decisions (when to log, evaluate, save, stop) are made here from values every rank agrees
on (`consensus.py`).
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import set_seed
from filelock import FileLock

from launcher import build, checkpoint, consensus, guards, profiling, progress, runlock, strategies
from launcher.batches import split
from launcher.compiling import FirstUpdates
from launcher.consensus import LostPeers, StepAgreement, StopRequests
from launcher.errors import RunFailed
from launcher.evaluation import Evaluator
from launcher.flops import device_peak
from launcher.metrics import Throughput
from launcher.preflight import Start, preflight
from launcher.recipe import Recipe
from launcher.rundir import RunDir
from launcher.saving import Saver
from launcher.strategies import DDP
from launcher.trainstate import LogWindow, RunResult
from launcher.updates import Updates

__all__ = ["RunResult", "Start", "preflight", "run"]


def run(recipe: Recipe, start: Start) -> RunResult:
    """Train `recipe` on this process's share of the work; every rank of a launch calls this alike."""
    strategy = strategies.choose(recipe, guards.launched_world(os.environ))
    with strategy.process_setup():
        try:
            resumed_world = None if start.saved is None else int(start.saved.get("world_size", 1))
            accelerator = strategy.accelerator(resumed_world)
        except BaseException:
            runlock.release(start.lock, undo=True)
            raise
        requests = StopRequests(recipe.train.max_time_s, Path(recipe.run_dir) / consensus.STOP_FILE)
        requests.install()
        opened = False  # until the run dir is written, a run that ends leaves it as it found it
        try:
            problem = guards.world_problem(os.environ, accelerator.num_processes, str(accelerator.distributed_type))
            if problem:
                raise RunFailed(f"error: {problem}", exit_code=2)
            consensus.refuse_together(accelerator, start.refusal)
            training = Training(accelerator, recipe, strategy, start, requests)
            opened = True  # `run` writes the run dir from its first line on
            return training.run()
        finally:
            requests.uninstall()
            tear_down(accelerator, start.lock, undo=not opened)


def tear_down(accelerator: Accelerator, lock: FileLock | None, undo: bool = False) -> None:
    """The order matters, on the way out with an error too: the prepared model, loaders and optimizer (and DDP's
    reducer with them) are freed while the process group still exists (freeing them after it was destroyed can
    block forever in gloo), then the trackers are closed and the process group destroyed before the interpreter
    exits (gloo's threads outliving it abort the process). `undo`: the run ended before it wrote anything."""
    accelerator.free_memory()
    gc.collect()
    accelerator.end_training()
    runlock.release(lock, undo)


class Training:
    """One attempt at the run: built in `__init__`, which writes nothing, then opened and trained by `run`."""

    def __init__(self, accelerator: Accelerator, recipe: Recipe, strategy: DDP, start: Start, requests: StopRequests):
        t, world = recipe.train, strategy.data_ranks
        self.accelerator, self.recipe, self.strategy = accelerator, recipe, strategy
        self.main = accelerator.is_main_process
        set_seed(t.seed)
        self.parts = p = build.build(accelerator, recipe, strategy, start.saved)
        self.samples_per_batch = t.batch_size * world  # one micro-batch on every data rank
        self.samples_per_epoch = (p.train_batches() or 0) * self.samples_per_batch  # 0: a stream, no epochs
        consensus.refuse_uneven_data(accelerator, p.train_batches(), p.val_batches(recipe.eval.max_batches))
        begin = build.begin(accelerator, recipe, strategy, p, start.resume_from, start.saved)
        self.state, self.budget = begin.state, begin.budget
        self.files = RunDir(accelerator, recipe)
        self.resume_from, self.restart = start.resume_from, start.restart
        self.progress = progress.make(
            self.budget.total_steps, self.state.step, recipe.name, self.main and recipe.logging.progress_bar
        )
        throughput = Throughput(device_peak(t.peak_flops, accelerator.device, t.mixed_precision), self.files.note)
        writer = checkpoint.Writer(
            accelerator, p.model, p.optimizer, begin.scheduler, strategy.checkpoint_format, recipe.checkpoint.async_save
        )
        writer.files, writer.data_state = p.model_files, p.data_state()
        self.saver = Saver(accelerator, recipe, strategy, p.model, writer, self.budget, throughput)
        self.evaluator = Evaluator(accelerator, recipe, p, self.state, throughput)
        self.compiling = FirstUpdates() if t.compile.enabled else None
        self.peers = LostPeers(accelerator, recipe.strategy.timeout_s)
        agreement = StepAgreement(accelerator, t.mixed_precision == "fp16", requests, self.peers)
        self.window = LogWindow.restored(self.state, begin.same_world(strategy.layout()), accelerator)
        self.updates = Updates(
            accelerator, p, begin.scheduler, agreement, self.state, self.window, self.progress, throughput,
            t.max_nonfinite_steps, t.clip_grad_norm,
        )  # fmt: skip
        # None unless this rank profiles (the recipe's `profile`): all an update then costs is the check for None.
        self.profiler = profiling.make(
            recipe.profile, accelerator, recipe.run_dir, self.state.step, self.budget.total_steps,
            lambda line: self.progress.write(line, file=sys.stderr),
        )  # fmt: skip

    def run(self) -> RunResult:
        """Open the run dir (nothing is written before: a run refused while it was built leaves it as it was),
        train, finish."""
        self.files.open(self.strategy, self.state.step, self.resume_from, self.restart)
        try:
            with self.peers.watch(lambda: self.state.step):
                stop_reason = self.train()
                self.finish(stop_reason)
        finally:
            if self.profiler is not None:
                self.profiler.close()  # on the way out with an error: what it recorded is written
            self.progress.close()
            self.files.close()
            with contextlib.suppress(Exception):  # on the way out with an error: let a write in flight land
                self.saver.writer.wait()
        return self.result(stop_reason)

    def train(self) -> str:
        """Epochs until the budget is spent or a reason to stop comes up; the reason."""
        state, p = self.state, self.parts
        stop_reason = "done" if state.step >= self.budget.total_steps else ""
        p.model.train()
        while not stop_reason:
            p.set_epoch(state.epoch)
            batches = p.epoch_batches(self.accelerator, state.samples_in_epoch, self.samples_per_batch)
            for inputs, targets in map(split, self.peers.each(batches)):
                state.samples_in_epoch += self.samples_per_batch
                with self.peers.waiting_for("the gradient all-reduce"):
                    if not self.updates.micro_step(inputs, targets):
                        continue
                    verdict = self.updates.update()
                stop_reason = self.after_update(verdict)
                if self.profiler is not None:
                    self.profiler.step(state.step)
                if stop_reason:
                    break
            else:
                state.epoch += 1
                state.samples_in_epoch = 0
                if self.evaluator.due_at_epoch_end(state.step):
                    self.updates.read_skips()
                    stop_reason = "diverged" if self.updates.diverged else "early stopping" if self.evaluate() else ""
        return stop_reason

    def after_update(self, verdict: consensus.Verdict) -> str:
        """Log, evaluate and save when due; the reason to stop, if there is one now. Where any of these is due the
        skips a fused optimizer decided on the device are read first (see `Updates.read_skips`): the row, the
        checkpoint and the stop are those of the host path."""
        step, total = self.state.step, self.budget.total_steps
        if self.compiling is not None and (seconds := self.compiling.tick()) is not None:
            self.compiling = None
            self.files.log({"compile_s": seconds}, step)
            if self.main:
                self.say(f"compiled in about {seconds:.1f} s (the first update's time beyond the second's)")
        logs = step % self.recipe.logging.every_steps == 0 or step == total
        if logs or verdict.stop or step >= total or self.evaluator.due_at_step(step) or self.saver.due(step):
            self.updates.read_skips()
        if logs:
            with self.peers.waiting_for("the loss all-reduce for logging"):
                self.files.log(self.updates.row(self.samples_per_epoch), step)
        if self.updates.diverged:
            return "diverged"
        stop_reason = ""
        if self.evaluator.due_at_step(step) and self.evaluate():
            stop_reason = "early stopping"
        if self.saver.due(step):
            self.save()
        if verdict.stop and not stop_reason:
            stop_reason = verdict.stop_reason  # the same on every rank, whichever was asked
        if not stop_reason and step >= total:
            stop_reason = "done"
        return stop_reason

    def evaluate(self) -> bool:
        """Evaluate (saving a best checkpoint); True when early stopping says stop."""
        with self.peers.waiting_for("the validation gather"):
            return self.evaluator.run(lambda values: self.files.log(values, self.state.step), self.save, self.say)

    def save(self) -> None:
        self.updates.read_skips()  # the counters and loss window saved are the host's
        with self.peers.waiting_for("the checkpoint barrier"):
            self.saver.save(self.state, self.window, self.evaluator.monitored(self.state.step), self.say)

    def say(self, line: str) -> None:
        self.progress.write(line)

    def finish(self, stop_reason: str) -> None:
        """The final evaluation and checkpoint; every rank leaves together."""
        if self.profiler is not None:
            self.profiler.close()  # a window the run's end cut short: written as far as it went
        self.progress.close()
        step = self.state.step
        with self.peers.waiting_for("the final evaluation and checkpoint"):
            if self.evaluator.due_at_end(step) and stop_reason != "diverged":
                self.evaluate()
            if self.saver.due_at_end(step, stop_reason):
                self.save()
            self.saver.writer.wait()
        with self.peers.waiting_for("the other processes to finish"):
            self.accelerator.wait_for_everyone()

    def result(self, stop_reason: str) -> RunResult:
        """Record how the attempt ended, say it, and raise for a run that diverged."""
        state, total = self.state, self.budget.total_steps
        self.files.finish({"stop_reason": stop_reason, "step": state.step, "total_steps": total, **self.evaluator.last})
        if stop_reason == "diverged":
            raise RunFailed(self.diverged_message() if self.main else "")
        if self.main:
            reason = "done" if stop_reason == "done" else f"stopped ({stop_reason})"
            summary = self.evaluator.summary()
            print(f"{reason} at step {state.step}/{total}  {summary}  run dir: {self.files.path}", flush=True)
        epochs = state.epoch + state.samples_in_epoch / max(self.samples_per_epoch, 1)
        return RunResult(state.step, epochs, stop_reason, self.evaluator.last, self.files.path)

    def diverged_message(self) -> str:
        state, t = self.state, self.recipe.train
        why = (
            f"error: stopped at step {state.step}: {self.updates.diverged_streak or state.nonfinite_streak} updates in "
            f"a row had a non-finite loss "
            f"or gradient norm (train.max_nonfinite_steps={t.max_nonfinite_steps}); "
        )
        if self.strategy.updates_in_backward:
            last_good = self.saver.latest()
            return why + f"DeepSpeed applied them, so no checkpoint was written; the last good one is {last_good}"
        return why + f"the last good state is in {self.saver.where(state.step)}"
