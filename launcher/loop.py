"""The training loop, top to bottom: build, prepare, train, evaluate, checkpoint, stop.

One loop for one CPU process, one GPU or many processes: Accelerate places the model and batches, syncs gradients
and runs mixed precision; the decisions (when to log, evaluate, save, stop) are made here from values every rank
agrees on.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.tracking import filter_trackers
from accelerate.utils import (
    DistributedDataParallelKwargs,
    InitProcessGroupKwargs,
    ProjectConfiguration,
    gather_object,
    set_seed,
)
from filelock import FileLock
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from launcher import checkpoint, components, consensus, guards, plan, runlock, schedules, strategies
from launcher.checkpoint import integrity
from launcher.early_stopping import Tracker
from launcher.errors import RecipeError, RunFailed, Throttled, say
from launcher.layout import (
    ENV_FILE,
    HISTORY_FILE,
    LAST_RUN_FILE,
    METRICS_FILE,
    RECIPE_FILE,
    ROLLED_BACK_FILE,
    read_json,
)
from launcher.metrics import JsonlWriter, Throughput, environment, flat_hparams, sequence_tokens
from launcher.recipe import Recipe, dump
from launcher.stepping import Stepper
from launcher.trackers import tracker_options, trackers, write_pending

# The checkpoint format each strategy writes and reads (see checkpoint/formats.py).
FORMAT_OF_STRATEGY = {"ddp": "full", "fsdp": "dcp", "deepspeed": "deepspeed"}


@dataclass
class TrainState:
    """The counters a resumed run needs to continue exactly where it stopped; saved as JSON in checkpoints."""

    step: int = 0  # optimizer updates done (skipped ones included: they consumed their batches)
    epoch: int = 0
    samples_in_epoch: int = 0  # samples of `epoch` already trained on, by all ranks: independent of world size
    skipped_steps: int = 0  # updates skipped for a non-finite loss or gradient norm, in all
    nonfinite_streak: int = 0  # of them, how many in a row up to now
    schedule_total: int = 0  # updates the learning-rate schedule spans (see plan.Budget)
    schedule_batch: int = 0  # samples one of them stands for; 0: the run counts updates (train.max_steps)
    schedule_position: float = 0.0  # the schedule's step at `step`
    log_windows: list[dict[str, Any]] = field(default_factory=list)  # per rank: losses not logged yet (see save)
    early_stopping: Tracker = field(default_factory=Tracker)
    best_checkpoints: list[list[float]] = field(default_factory=list)  # [step, metric], best first

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> TrainState:
        values = {k: v for k, v in state.items() if k in {f.name for f in fields(cls)}}
        values["early_stopping"] = Tracker.from_state_dict(values["early_stopping"])
        return cls(**values)


@dataclass(frozen=True)
class RunResult:
    steps: int
    epochs_done: float
    stop_reason: str  # "done", "early stopping", or what asked the run to stop (SIGTERM, max_time_s reached)
    metrics: dict[str, float]
    run_dir: Path


@dataclass
class Start:
    """What `preflight` found: the checkpoint to resume from, the run dir's lock (held by the main process), and
    what this process refuses the run for where the others must hear of it first (see `run`)."""

    resume_from: Path | None = None
    lock: FileLock | None = None
    refusal: list[str] = field(default_factory=list)


def preflight(recipe: Recipe, env: Mapping[str, str]) -> Start:
    """Refuse, before any process group starts or file is written, what would fail or destroy work later; take
    the run dir's lock (main process), so that nothing below races another run on the same run dir.

    What follows from the recipe and the launch alone is the same on every process: refused at once. What depends
    on the run dir (another run holding it, its checkpoints) can change between two processes' looks while another
    run writes there: with several processes it is agreed on first, so that all of them refuse together instead of
    some waiting for the others in the process group until the timeout."""
    t = recipe.train
    problems = guards.launch_problems(env, t.mixed_precision, recipe.strategy.name, t.gradient_accumulation_steps)
    if t.mixed_precision == "fp16" and not torch.cuda.is_available():
        problems.append("train.mixed_precision: fp16 needs a CUDA GPU; use bf16 or no on CPU")
    if problems:
        raise RecipeError(problems)
    run_dir = Path(recipe.run_dir)
    alone = int(env.get("WORLD_SIZE", "1") or 1) == 1
    lock, existed = None, run_dir.is_dir()
    if env.get("RANK", "0") == "0":
        lock = runlock.acquire(run_dir)
        if lock is None:
            return _refused([runlock.in_use_message(run_dir)], alone)
    try:
        if lock is not None:
            # A stop file asked the last attempt to stop; this one starts anew (before any process looks for it).
            (run_dir / consensus.STOP_FILE).unlink(missing_ok=True)
        return Start(resume_from=_resume_point(recipe, env), lock=lock)
    except RecipeError as e:
        runlock.release(lock, remove_dir=not existed)
        return _refused(e.problems, alone)
    except BaseException:
        runlock.release(lock, remove_dir=not existed)
        raise


def _refused(problems: list[str], alone: bool) -> Start:
    if alone:
        raise RecipeError(problems)
    return Start(refusal=problems)


def _resume_point(recipe: Recipe, env: Mapping[str, str]) -> Path | None:
    """The checkpoint to resume from, if any; refuses to start a new run over an old one."""
    run_dir = Path(recipe.run_dir)
    if recipe.resume == "auto":
        main = env.get("RANK", "0") == "0"
        if main:
            for path in checkpoint.incomplete(recipe.checkpoint_dir):
                say(f"warning: ignoring {path}: an interrupted save left it incomplete")
        # Every rank checks the same files, so all pick the same checkpoint without a word between them.
        found, passed_over = checkpoint.latest_intact(recipe.checkpoint_dir)
        if main:
            for line in passed_over:
                say(f"warning: passing over {line}")
        if found is None and passed_over:  # starting anew would train over the run's checkpoints
            raise RecipeError(
                f"resume: every checkpoint in {recipe.checkpoint_dir} is damaged, the newest: {passed_over[0]}"
            )
        return found
    if recipe.resume != "none":
        path = checkpoint.resolve(Path(recipe.resume))
        if not checkpoint.is_complete(path):
            raise RecipeError(f"resume: {path} is not a complete checkpoint (no {checkpoint.STATE_FILE})")
        if checkpoint.interrupted(path):
            raise RecipeError(f"resume: {path} is not a complete checkpoint (a save interrupted before its rename)")
        problem = integrity.problems(path)
        if problem:
            raise RecipeError(f"resume: {path}: damaged: {problem}")
        return path
    if (run_dir / METRICS_FILE).exists() or checkpoint.complete_steps(recipe.checkpoint_dir):
        raise RecipeError(
            f"run_dir: {run_dir} already holds a run; continue it with resume=auto, "
            f"or start a new one with run_dir=<another folder>"
        )
    return None


def run(recipe: Recipe, start: Start) -> RunResult:
    """Train `recipe` on this process's share of the work; every rank of a launch calls this alike."""
    t = recipe.train
    resume_from = start.resume_from
    try:
        accelerator = make_accelerator(recipe, resume_from)
    except BaseException:
        runlock.release(start.lock)
        raise
    stop_requests = consensus.StopRequests(t.max_time_s, Path(recipe.run_dir) / consensus.STOP_FILE)
    stop_requests.install()
    try:
        problem = guards.world_problem(os.environ, accelerator.num_processes, str(accelerator.distributed_type))
        if problem:
            raise RunFailed(f"error: {problem}", exit_code=2)
        _refuse_together(accelerator, start.refusal)
        # Only now may trackers create their files (TensorBoard's event file is made as its writer is).
        accelerator.log_with = filter_trackers(
            trackers(
                recipe.logging.trackers,
                recipe.run_dir,
                None if resume_from is None else checkpoint.saved_step(resume_from),
            ),
            recipe.run_dir,
        )
        return train(accelerator, recipe, resume_from, stop_requests)
    finally:
        stop_requests.uninstall()
        # The order matters, on the way out with an error too: the prepared model, loaders and optimizer (and
        # DDP's reducer with them) are freed while the process group still exists (freeing them after it was
        # destroyed can block forever in gloo), then the trackers are closed and the process group destroyed
        # before the interpreter exits (gloo's threads outliving it abort the process).
        accelerator.free_memory()
        gc.collect()
        accelerator.end_training()
        runlock.release(start.lock)


def _refuse_together(accelerator: Accelerator, refusal: list[str]) -> None:
    """Refuse on every rank if `preflight` refused on any (another run holding the run dir, which only the main
    process knows; checkpoints another run changed between two processes' looks): the first rank that refused
    says why, and all leave together (a rank gone while another still reads the verdict would make that one fail
    with a traceback). A rank that refused refuses whatever becomes of the collective."""
    if accelerator.num_processes == 1:
        if refusal:
            raise RecipeError(refusal)
        return
    try:
        refused = gather_object([bool(refusal)])
        if any(refused):
            accelerator.wait_for_everyone()
    except (torch.distributed.DistError, RuntimeError):
        if not refusal:
            raise
        raise RecipeError(refusal) from None
    if not any(refused):
        return
    if refusal and refused.index(True) == accelerator.process_index:
        raise RecipeError(refusal)
    raise RunFailed("", exit_code=2)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launched_world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def make_accelerator(recipe: Recipe, resume_from: Path | None = None) -> Accelerator:
    """The Accelerator for the recipe's strategy. DDP and DeepSpeed are Accelerate's; FSDP2 is applied by the loop
    itself (`strategies.fsdp_shard`), on CPU and GPU alike, so Accelerate only runs the process group there."""
    t, s = recipe.train, recipe.strategy
    cuda = torch.cuda.is_available()
    common: dict[str, Any] = {
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "project_config": ProjectConfiguration(project_dir=recipe.run_dir, logging_dir=recipe.run_dir),
        "dataloader_config": DataLoaderConfiguration(use_seedable_sampler=True, data_seed=t.seed),
        "step_scheduler_with_optimizer": False,
    }
    timeout = timedelta(seconds=s.timeout_s)
    if s.name == "deepspeed":
        from accelerate.utils import DeepSpeedPlugin

        if "WORLD_SIZE" not in os.environ:  # one process, not started by a launcher: DeepSpeed still wants a group
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
        # DeepSpeed calls collectives torch has renamed; the warning would repeat at every step, on every rank.
        warnings.filterwarnings("ignore", r"`torch\.distributed\.\w+` is deprecated", FutureWarning)
        user = strategies.read_user_config(s.deepspeed.config)[0] if s.deepspeed.config else None
        config = strategies.deepspeed_config(recipe, _launched_world(), user)
        if resume_from is not None and checkpoint.saved_world_size(resume_from) != _launched_world():
            config["checkpoint"] = {"load_universal": True}  # resuming on another number of processes
        # Without CUDA, DeepSpeed runs over gloo; Accelerate must then be told, or it sees a world of one.
        group = InitProcessGroupKwargs(timeout=timeout, **({} if cuda else {"backend": "gloo"}))
        return Accelerator(
            cpu=False,
            mixed_precision=t.mixed_precision,
            deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=config),
            kwargs_handlers=[group],
            **common,
        )
    # FSDP computes in bf16 through its MixedPrecisionPolicy, not autocast (one process: nothing to shard, autocast).
    fsdp_sharded = s.name == "fsdp" and _launched_world() > 1
    return Accelerator(
        cpu=not cuda,
        # On CPU, models and batches are where they belong already: placing them would only cost time per batch.
        device_placement=cuda,
        mixed_precision="no" if fsdp_sharded else t.mixed_precision,
        kwargs_handlers=[
            DistributedDataParallelKwargs(find_unused_parameters=s.find_unused_parameters),
            InitProcessGroupKwargs(timeout=timeout),
        ],
        **common,
    )


def train(
    accelerator: Accelerator, recipe: Recipe, resume_from: Path | None, stop_requests: consensus.StopRequests
) -> RunResult:
    t = recipe.train
    set_seed(t.seed)
    main = accelerator.is_main_process

    # Build. The train set may tell the model what it needs (vocab_size, num_classes); the recipe's values win.
    train_set = components.instantiate("data", recipe.data.train, key="data.train")
    val_set = components.instantiate("data", recipe.data.val, key="data.val") if recipe.data.val else None
    model = components.instantiate("model", recipe.model, **getattr(train_set, "model_kwargs", {}))
    strategy = recipe.strategy.name
    fsdp_sharded = strategy == "fsdp" and accelerator.num_processes > 1
    if fsdp_sharded:
        if main and not torch.cuda.is_available():
            say(
                "note: strategy fsdp on CPU: Accelerate's FSDP needs a GPU, so the model is sharded with torch's "
                "fully_shard over gloo, as the launcher does on GPUs too"
            )
        try:
            model = strategies.fsdp_shard(model, recipe, accelerator.device)
        except ValueError as e:
            raise RunFailed(f"error: {e}", exit_code=2) from None
    elif strategy == "fsdp" and main:
        say("note: strategy fsdp with one process: nothing to shard; checkpoints are still DCP")
    loss_fn = components.instantiate("loss", recipe.loss)
    optimizer = components.instantiate("optimizer", recipe.optimizer, model.parameters())
    train_loader = make_loader(train_set, t.batch_size, recipe.data.shuffle, recipe.data.drop_last, recipe)
    val_loader = make_loader(val_set, recipe.eval.batch_size or t.batch_size, False, False, recipe) if val_set else None

    if fsdp_sharded:  # already sharded: Accelerate would wrap it in DDP
        optimizer, train_loader = accelerator.prepare(optimizer, train_loader)
    else:
        model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    if val_loader is not None:
        val_loader = accelerator.prepare(val_loader)

    samples_per_batch = t.batch_size * accelerator.num_processes  # one micro-batch on every rank
    samples_per_epoch = len(train_loader) * samples_per_batch
    stepper = Stepper(accelerator, model, optimizer, strategy)
    _check_equal_lengths(accelerator, train_loader, val_loader, recipe.eval.max_batches)

    state = TrainState(early_stopping=Tracker(**_tracker_args(recipe.early_stopping)))
    saved: dict[str, Any] | None = None
    if resume_from is not None:
        saved = read_json(resume_from / checkpoint.STATE_FILE)
        state = TrainState.from_state_dict(saved)
        if saved.get("world_size", accelerator.num_processes) != accelerator.num_processes:
            # Another world size splits the epoch into other global batches: continue at the last whole one.
            state.samples_in_epoch = state.samples_in_epoch // samples_per_batch * samples_per_batch
        saved = {**saved, "batches_done": state.samples_in_epoch // samples_per_batch}
    budget = plan.budget(
        len(train_loader),
        t.gradient_accumulation_steps,
        samples_per_batch * t.gradient_accumulation_steps,
        t.max_steps,
        t.max_epochs,
        saved,
    )
    total_steps = budget.total_steps
    state.schedule_total, state.schedule_batch = budget.schedule_total, budget.schedule_batch
    scheduler = make_scheduler(recipe, stepper.optimizer, budget)
    if resume_from is not None and saved is not None:
        checkpoint.load(accelerator, resume_from, model, optimizer, scheduler, FORMAT_OF_STRATEGY[strategy])
        accelerator.print(f"resumed from {resume_from} at step {state.step}")
        saved_world = saved.get("world_size", accelerator.num_processes)
        if saved_world != accelerator.num_processes:
            accelerator.print(_world_change_note(saved, state, budget, recipe, accelerator.num_processes))
    # Files. Every rank has reached this point (the barrier below), so nothing is written before all passed
    # preflight.
    run_dir = Path(recipe.run_dir)
    accelerator.wait_for_everyone()
    jsonl = None
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / RECIPE_FILE).write_text(dump(recipe))
        env = environment(
            accelerator.num_processes, str(accelerator.distributed_type), t.mixed_precision, str(accelerator.device)
        )
        env["strategy"] = strategy
        (run_dir / ENV_FILE).write_text(json.dumps(env, indent=2))
        resumed_from = str(resume_from) if resume_from else None
        record(run_dir, "start", step=state.step, resumed_from=resumed_from, world_size=accelerator.num_processes)
        if "jsonl" in recipe.logging.trackers:
            if resume_from is not None:
                roll_back_metrics(run_dir, state.step)
            jsonl = JsonlWriter(run_dir / METRICS_FILE)
    # The recipe's name is the wandb project and MLflow experiment; the run dir's name, the run's.
    accelerator.init_trackers(
        recipe.name or "launcher", config=flat_hparams(recipe.to_dict()), init_kwargs=tracker_options(run_dir)
    )

    def log(values: dict[str, float]) -> None:
        accelerator.log(values, step=state.step)
        if jsonl is not None:
            jsonl.write(state.step, values)

    fmt = FORMAT_OF_STRATEGY[strategy]
    writer = checkpoint.Writer(accelerator, model, optimizer, scheduler, fmt, background=recipe.checkpoint.async_save)

    def save_step() -> None:
        nonlocal last_save_step
        with throughput.paused():
            ckpt = recipe.checkpoint
            # The replicas' checksums go with the checkpoint: proof, or a warning, that every rank holds one model.
            # (Sharded strategies hold different shards by design: nothing to compare.)
            checksums = [] if recipe.strategy.sharded else consensus.replica_checksums(accelerator, model)
            if len(set(checksums)) > 1 and main:
                progress.write(f"warning: step {state.step}: the processes' parameters differ: {checksums}")
            value = last_eval.get(ckpt.monitor) if last_eval_step == state.step else None
            monitor = {"name": ckpt.monitor, "mode": ckpt.mode, "value": value}
            state.schedule_position = float(budget.position(state.step))
            state.log_windows = _log_windows(accelerator, step_losses, loss_count)
            trainer_state = {**state.state_dict(), "monitor": monitor, "replica_checksums": checksums}
            best = [list(b) for b in state.best_checkpoints]
            writer.save(
                recipe.checkpoint_dir / checkpoint.step_dir_name(state.step),
                trainer_state,
                dump(recipe),
                after=lambda: checkpoint.prune(recipe.checkpoint_dir, ckpt.keep_last, best),
            )
            last_save_step = state.step
            write_pending(accelerator.trackers)

    progress = tqdm(
        total=total_steps,
        initial=state.step,
        desc=recipe.name,
        disable=not (main and recipe.logging.progress_bar),
        dynamic_ncols=True,
        mininterval=0.1 if sys.stderr.isatty() else 30.0,  # a log file gets a line every 30 s, not a flood
    )
    throughput = Throughput()
    fp16 = t.mixed_precision == "fp16"
    # One process reads its stop requests at every step; several agree on them about once a second (at every step
    # with fp16, whose divergence verdict needs the agreement).
    stop_checks = consensus.StopChecks(every_s=1.0 if accelerator.num_processes > 1 and not fp16 else 0.0)
    # A rank whose loss is not finite must tell the others (see below); a single process sees it itself.
    poison = accelerator.num_processes > 1 and not fp16
    # The updates applied since the last log line, and their micro-batches; a resumed run gets those its checkpoint
    # was saved with, so its next line averages the same steps as a run that never stopped.
    step_losses, loss_count = _restored_log_window(state, saved, accelerator)
    skipped_notices = Throttled(every_s=10.0)
    step_loss = torch.zeros((), device=accelerator.device)  # summed over the micro-batches of the current update
    step_batches = 0
    grad_norm = torch.zeros(())
    last_eval: dict[str, float] = {}
    last_eval_step = last_save_step = -1
    stop_reason = "done" if state.step >= total_steps else ""
    waiting_for = "the first batch"  # what a lost peer would leave this rank waiting for

    def evaluate_and_decide() -> bool:
        """Evaluate, log, keep the best checkpoint; True when early stopping says stop (same on all ranks)."""
        nonlocal last_eval, last_eval_step
        assert val_loader is not None
        with throughput.paused():
            last_eval = evaluate(accelerator, model, val_loader, loss_fn, recipe.eval.max_batches)
        last_eval_step = state.step
        log(last_eval)
        if main:
            progress.write(f"step {state.step}: " + "  ".join(f"{k} {v:.4f}" for k, v in last_eval.items()))
        ckpt = recipe.checkpoint
        if ckpt.keep_best:
            # Every rank ranks the same global metric, so all agree whether this state is worth a checkpoint.
            value = _metric(last_eval, ckpt.monitor, "checkpoint.monitor")
            state.best_checkpoints = checkpoint.rank_best(
                state.best_checkpoints, state.step, value, ckpt.keep_best, ckpt.mode
            )
            if any(step == state.step for step, _ in state.best_checkpoints):
                save_step()  # (again, if this step was saved before its evaluation: now with its metric)
        es = recipe.early_stopping
        if es is None:
            return False
        value = _metric(last_eval, es.monitor, "early_stopping.monitor")
        state.early_stopping = state.early_stopping.update(value, state.step)
        # Every rank computed the same global metric; the all-reduce still makes the verdict one value.
        return consensus.any_rank(accelerator, state.early_stopping.should_stop(es.patience))

    model.train()
    try:
        while not stop_reason:
            train_loader.set_epoch(state.epoch)
            batches = train_loader
            if state.samples_in_epoch:  # resuming inside an epoch: same order, the samples already seen skipped
                batches = accelerator.skip_first_batches(train_loader, state.samples_in_epoch // samples_per_batch)
            waiting_for = "the next batch"
            for inputs, targets in batches:
                state.samples_in_epoch += samples_per_batch
                waiting_for = "the gradient all-reduce"
                with stepper.accumulate():
                    if fsdp_sharded:  # FSDP2 has no no_sync(): reduce-scatter only on the update's last micro-batch
                        model.set_requires_gradient_sync(accelerator.sync_gradients)
                    loss = compute_loss(loss_fn, model(inputs), targets)
                    # A non-finite loss makes this rank's gradients NaN, and through their all-reduce every rank's
                    # (fp16's loss scaler skips overflowing gradients itself: there the loss goes into the verdict).
                    stepper.backward(consensus.poison_nonfinite(loss) if poison else loss)
                step_loss = loss.detach() if step_batches == 0 else step_loss + loss.detach()
                step_batches += 1
                throughput.add(
                    len(targets) * accelerator.num_processes, sequence_tokens(targets) * accelerator.num_processes
                )
                if not accelerator.sync_gradients:
                    continue

                # A step boundary: gradients are synchronised. The norm is the global one, after unscaling (inf
                # measures without clipping); it is logged as it was before clipping.
                # DeepSpeed clips inside its step (its config has the recipe's clip_grad_norm) and reports the norm.
                grad_norm = stepper.clip(t.clip_grad_norm)
                # The norm of the synchronised gradients is the same on every rank, and not finite on every rank if
                # any rank's loss or gradients were not. With fp16 only a non-finite loss is divergence, and only
                # this rank's: it goes into the agreement, which then happens at every step. A single process
                # watches its loss and norm together (one sum is finite only if both are).
                nonfinite = ~torch.isfinite(step_loss if fp16 else grad_norm if poison else grad_norm + step_loss)
                if stop_checks.due(state.step):
                    waiting_for = "the other processes' step verdict"
                    proposal = stop_checks.proposal(state.step)
                    verdict = consensus.agree(accelerator, stop_requests.code(), nonfinite, proposal)
                    stop_checks.agreed(state.step, verdict.next_check_in)
                else:
                    verdict = consensus.Verdict(stop_code=0, skip_step=bool(nonfinite))
                if verdict.skip_step:
                    state.skipped_steps += 1
                    state.nonfinite_streak += 1
                    if main:
                        skipped_notices.say(
                            f"warning: step {state.step + 1}: update skipped: the loss or gradient norm is not "
                            f"finite ({state.nonfinite_streak} in a row; {t.max_nonfinite_steps} in a row stop the "
                            "run)",
                            write=lambda line: progress.write(line, file=sys.stderr),
                        )
                    if accelerator.scaler is not None:
                        accelerator.scaler.update()  # closes the step that unscale_ opened, without applying it
                else:
                    stepper.step()
                    state.nonfinite_streak = 0
                    step_losses.append(step_loss)
                    loss_count += step_batches
                stepper.zero_grad()
                step_batches = 0
                scheduler.step()
                state.step += 1
                progress.update(1)

                if state.step % recipe.logging.every_steps == 0 or state.step == total_steps:
                    waiting_for = "the loss all-reduce for logging"
                    # NaN when every update since the last line was skipped: there is no loss to show.
                    loss_sum = torch.stack(step_losses).sum() if step_losses else step_loss.new_full((), math.nan)
                    train_loss = accelerator.reduce(loss_sum / max(loss_count, 1), reduction="mean").item()
                    step_losses.clear()
                    loss_count = 0
                    values = {
                        "train/loss": train_loss,
                        "lr": scheduler.get_last_lr()[0],
                        "grad_norm": float(grad_norm),
                        "epoch": state.epoch + state.samples_in_epoch / samples_per_epoch,
                        "train/skipped_steps": state.skipped_steps,
                        **throughput.rates(),
                    }
                    log(values)
                    # Shown at the bar's next redraw: forcing one here would write a line to a log file each time.
                    progress.set_postfix(loss=f"{train_loss:.4f}", lr=f"{values['lr']:.2e}", refresh=False)
                if state.nonfinite_streak >= t.max_nonfinite_steps:
                    stop_reason = "diverged"
                    break
                if val_loader is not None and recipe.eval.every_steps and state.step % recipe.eval.every_steps == 0:
                    waiting_for = "the validation gather"
                    if evaluate_and_decide():
                        stop_reason = "early stopping"
                every = recipe.checkpoint.every_steps
                if every and state.step % every == 0 and last_save_step != state.step:
                    waiting_for = "the checkpoint barrier"
                    save_step()
                if verdict.stop and not stop_reason:
                    stop_reason = verdict.stop_reason  # the same on every rank, whichever was asked
                if not stop_reason and state.step >= total_steps:
                    stop_reason = "done"
                if stop_reason:
                    break
                waiting_for = "the next batch"
            else:
                state.epoch += 1
                state.samples_in_epoch = 0
                if val_loader is not None and recipe.eval.every_epoch and last_eval_step != state.step:
                    waiting_for = "the validation gather"
                    if evaluate_and_decide():
                        stop_reason = "early stopping"

        progress.close()
        waiting_for = "the final evaluation and checkpoint"
        if val_loader is not None and last_eval_step != state.step and stop_reason != "diverged":
            evaluate_and_decide()
        # A run that was asked to stop (preemption, wall time) saves whatever save_final says: resuming it is the
        # point. After divergence the state saved is the last good one, since skipped updates changed nothing.
        asked_to_stop = stop_reason not in ("done", "early stopping")
        # DeepSpeed applies an update inside backward, before the verdict: after divergence its state is not good.
        polluted = stop_reason == "diverged" and strategy == "deepspeed"
        if (recipe.checkpoint.save_final or asked_to_stop) and last_save_step != state.step and not polluted:
            save_step()
        writer.wait()
        waiting_for = "the other processes to finish"
        accelerator.wait_for_everyone()  # all ranks leave together
    except (torch.distributed.DistError, RuntimeError) as e:
        if accelerator.num_processes == 1 or not _lost_peer(e):
            raise
        raise RunFailed(
            f"error: rank {accelerator.process_index}: at step {state.step}, gave up waiting for {waiting_for}: "
            f"another process died or hung ({_first_line(e)}); strategy.timeout_s={recipe.strategy.timeout_s:g}"
        ) from None
    finally:
        progress.close()
        if jsonl is not None:
            jsonl.close()
        with contextlib.suppress(Exception):  # on the way out with an error: let a write in flight land
            writer.wait()

    summary = "  ".join(f"{k} {v:.4f}" for k, v in last_eval.items())
    if main:
        # How this attempt ended, for whatever runs it next (the SLURM job script requeues a stopped run).
        outcome = {"stop_reason": stop_reason, "step": state.step, "total_steps": total_steps, **last_eval}
        (run_dir / LAST_RUN_FILE).write_text(json.dumps(outcome) + "\n")
        record(run_dir, "end", step=state.step, stop_reason=stop_reason)
    if stop_reason == "diverged" and strategy == "deepspeed":
        raise RunFailed(
            f"error: stopped at step {state.step}: {state.nonfinite_streak} updates in a row had a non-finite loss "
            f"or gradient norm (train.max_nonfinite_steps={t.max_nonfinite_steps}); DeepSpeed applied them, so no "
            f"checkpoint was written; the last good one is {checkpoint.latest(recipe.checkpoint_dir)}"
            if main
            else ""
        )
    if stop_reason == "diverged":
        raise RunFailed(
            f"error: stopped at step {state.step}: {state.nonfinite_streak} updates in a row had a non-finite loss "
            f"or gradient norm (train.max_nonfinite_steps={t.max_nonfinite_steps}); the last good state is in "
            f"{recipe.checkpoint_dir / checkpoint.step_dir_name(state.step)}"
            if main
            else ""
        )
    if main:
        reason = "done" if stop_reason == "done" else f"stopped ({stop_reason})"
        print(f"{reason} at step {state.step}/{total_steps}  {summary}  run dir: {run_dir}", flush=True)
    return RunResult(
        steps=state.step,
        epochs_done=state.epoch + state.samples_in_epoch / samples_per_epoch,
        stop_reason=stop_reason,
        metrics=last_eval,
        run_dir=run_dir,
    )


def _world_change_note(
    saved: dict[str, Any], state: TrainState, budget: plan.Budget, recipe: Recipe, world: int
) -> str:
    """What a resume on another number of processes keeps and what it changes, in one line."""
    saved_world = saved.get("world_size", world)
    how = (
        f"the epoch budget is kept: {budget.total_steps - state.step} updates of "
        f"{recipe.train.batch_size * world * recipe.train.gradient_accumulation_steps} samples remain, and the "
        f"learning-rate schedule follows the samples trained"
        if budget.remapped
        else "the model, optimizer and schedule are exact"
    )
    if budget.remapped and recipe.scheduler.short_name not in schedules.SCHEDULES:
        how += f" (but {recipe.scheduler.target} counts updates: its curve is stretched to the new count)"
    fresh = f"; processes beyond {saved_world} start from fresh RNG states" if saved_world < world else ""
    return (
        f"warning: written by {saved_world} processes, resumed by {world}: {how}; the data continues at sample "
        f"{state.samples_in_epoch} of epoch {state.epoch} (saved at {saved.get('samples_in_epoch')}){fresh}"
    )


def _log_windows(accelerator: Accelerator, losses: list[torch.Tensor], batches: int) -> list[dict[str, Any]]:
    """Every rank's losses not logged yet, for the checkpoint (float32 values are exact as JSON numbers)."""
    window = {
        "losses": torch.stack(losses).tolist() if losses else [],
        "dtype": str(losses[0].dtype).removeprefix("torch.") if losses else "float32",
        "batches": batches,
    }
    return list(gather_object([window])) if accelerator.num_processes > 1 else [window]


def _restored_log_window(
    state: TrainState, saved: dict[str, Any] | None, accelerator: Accelerator
) -> tuple[list[torch.Tensor], int]:
    """This rank's losses not logged when the checkpoint was saved; none on another world size (the ranks' shares
    of the data differ, and so do the rows)."""
    windows = state.log_windows
    state.log_windows = []
    rank = accelerator.process_index
    same_world = saved is not None and saved.get("world_size") == accelerator.num_processes
    if not same_world or rank >= len(windows):
        return [], 0
    window = windows[rank]
    dtype = getattr(torch, window["dtype"])
    losses = [torch.tensor(v, dtype=dtype, device=accelerator.device) for v in window["losses"]]
    return losses, int(window["batches"])


def _check_equal_lengths(
    accelerator: Accelerator, train_loader: DataLoader, val_loader: DataLoader | None, max_batches: int | None
) -> None:
    """Refuse, before the first step, data that gives no batch (an epoch would never end) or gives the processes
    different numbers of batches (a dataset that shards itself unevenly): the longer ones would wait at a
    collective for the shorter ones until the timeout."""
    if len(train_loader) == 0:  # the same on every rank unless the data is uneven, which the check below names
        raise RunFailed(
            "error: data.train: no batch to train on (fewer samples per process than train.batch_size with "
            "data.drop_last); give more samples, a smaller batch_size or drop_last=false"
            if accelerator.is_main_process
            else "",
            exit_code=2,
        )
    if accelerator.num_processes == 1:
        return
    val = 0 if val_loader is None else len(val_loader)
    mine = (len(train_loader), val if max_batches is None else min(val, max_batches))
    lengths = gather_object([mine])
    if len(set(lengths)) == 1:
        return
    accelerator.wait_for_everyone()  # every rank has the counts before any leaves
    key, which = ("data.train", 0) if len({n[0] for n in lengths}) > 1 else ("data.val", 1)
    counts = ", ".join(f"rank {rank}: {n[which]}" for rank, n in enumerate(lengths))
    raise RunFailed(
        f"error: {key}: the processes have different numbers of batches ({counts}); every process must get as "
        "many (a dataset that shards itself must give each rank the same length), or they would wait for each "
        "other forever"
        if accelerator.is_main_process
        else "",
        exit_code=2,
    )


def record(run_dir: Path, event: str, **values: Any) -> None:
    """A line in the run's history: when an attempt started (and from which checkpoint) or ended, and how."""
    with (run_dir / HISTORY_FILE).open("a") as f:
        f.write(json.dumps({"event": event, "time": round(time.time(), 3), **values}) + "\n")


def _lost_peer(e: BaseException) -> bool:
    """Whether a collective failed because another process went away or stopped answering."""
    if isinstance(e, torch.distributed.DistError):
        return True
    text = str(e).lower()
    return any(s in text for s in ("gloo", "nccl", "connection", "timed out", "timeout", "socket", "peer"))


def _first_line(e: BaseException) -> str:
    lines = [line for line in str(e).splitlines() if line.strip()]
    return lines[0][:200] if lines else type(e).__name__


def roll_back_metrics(run_dir: Path, step: int) -> None:
    """Make `metrics.jsonl` end at `step`, where a resumed run picks up: rows a crashed attempt logged after its
    last checkpoint are moved to `metrics.rolled_back.jsonl`, so the run's curve has one value per step and
    nothing on disk is lost."""
    path = run_dir / METRICS_FILE
    if not path.exists():
        return
    keep, drop = [], []
    for line in path.read_text().splitlines(keepends=True):
        try:
            after = json.loads(line)["step"] > step
        except (ValueError, KeyError, TypeError):
            after = True  # a line cut short by the crash
        (drop if after else keep).append(line)
    if drop:
        with (run_dir / ROLLED_BACK_FILE).open("a") as f:
            f.writelines(drop)
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(keep))
        tmp.replace(path)


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, drop_last: bool, recipe: Recipe) -> DataLoader:
    return DataLoader(
        dataset,
        # Its own generator: starting an iterator then draws worker seeds from it, not from the global RNG, so the
        # global stream (dropout, ...) does not depend on where in an epoch a resumed run starts iterating.
        generator=torch.Generator().manual_seed(recipe.train.seed),
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=drop_last,
        num_workers=recipe.data.num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=recipe.data.num_workers > 0,
    )


def make_scheduler(recipe: Recipe, optimizer: torch.optim.Optimizer, budget: plan.Budget) -> Any:
    """A built-in schedule becomes a LambdaLR over its pure function, at the budget's position for each update;
    any other is built with the optimizer."""
    spec = recipe.scheduler
    if spec.short_name in schedules.SCHEDULES:
        factor = schedules.build(spec.short_name, budget.schedule_total, **dict(spec.kwargs))
        # A plain function, not an object: LambdaLR's state dict would carry an object's attributes.
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: factor(budget.position(step)))
    return components.instantiate("scheduler", spec, optimizer)


def compute_loss(loss_fn: torch.nn.Module, output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The loss of a batch; sequence outputs (batch, time, classes) with integer targets are flattened."""
    if output.dim() > 2 and targets.dim() == output.dim() - 1 and not targets.is_floating_point():
        return loss_fn(output.reshape(-1, output.shape[-1]), targets.reshape(-1))
    return loss_fn(output, targets)


@torch.no_grad()
def evaluate(
    accelerator: Accelerator,
    model: torch.nn.Module,
    loader: DataLoader,
    loss_fn: torch.nn.Module,
    max_batches: int | None,
) -> dict[str, float]:
    """Mean loss (and accuracy, for classification) over the validation set, each sample counted once across all
    ranks: per-sample values are gathered, and the padding Accelerate adds to even out ranks is dropped."""
    per_sample_loss_fn = copy.copy(loss_fn)
    per_sample = hasattr(per_sample_loss_fn, "reduction")
    if per_sample:
        per_sample_loss_fn.reduction = "none"
    classify = isinstance(loss_fn, torch.nn.CrossEntropyLoss)
    model.eval()
    loss_total, correct_total, count = 0.0, 0.0, 0
    for i, (inputs, targets) in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        output = model(inputs)
        batch = len(targets)
        if per_sample:
            losses = compute_loss(per_sample_loss_fn, output, targets).float().reshape(batch, -1).mean(dim=1)
        else:  # a loss without `reduction`: its batch mean stands for each sample of the batch
            losses = compute_loss(loss_fn, output, targets).float().expand(batch)
        gathered = [losses]
        if classify:
            gathered.append((output.argmax(dim=-1) == targets).float().reshape(batch, -1).mean(dim=1))
        gathered = accelerator.gather_for_metrics(gathered)
        loss_total += gathered[0].sum().item()
        count += len(gathered[0])
        if classify:
            correct_total += gathered[1].sum().item()
    model.train()
    results = {"val/loss": loss_total / max(count, 1)}
    if classify:
        results["val/accuracy"] = correct_total / max(count, 1)
    return results


def _metric(values: dict[str, float], name: str, key: str) -> float:
    if name not in values:
        raise RecipeError(
            f"{key}: {name!r} is not a validation metric of this run (it has: {', '.join(sorted(values))})"
        )
    return values[name]


def _tracker_args(es: Any) -> dict[str, Any]:
    return {} if es is None else {"mode": es.mode, "min_delta": es.min_delta}
