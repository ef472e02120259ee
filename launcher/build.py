"""A run built from its recipe: data, model, loss and optimizer, prepared by the strategy; the state it starts
from (a checkpoint's, when it resumes) and its learning-rate schedule over the run's budget."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, Dataset

from launcher import checkpoint, chunked_loss, components, losses, models, param_groups, plan, schedules
from launcher.checkpoint import adapters
from launcher.data.streaming import StreamLoader, TokenStream, saved_pass
from launcher.early_stopping import Tracker
from launcher.errors import RecipeError
from launcher.layout import mesh_text, recorded_split
from launcher.models import hf, lora
from launcher.precision import Precision, keep_output_precision
from launcher.recipe import Recipe
from launcher.strategies import DDP
from launcher.strategies.stepping import Stepper, fused_skipping, match_fused
from launcher.trainstate import TrainState


@dataclass
class Parts:
    """What trains, as the strategy runs it."""

    model: torch.nn.Module
    loss_fn: torch.nn.Module | None  # None: the model's own loss (see `batches.batch_loss`)
    optimizer: Any
    train_loader: DataLoader | StreamLoader  # a stream's: not prepared by Accelerate (see data/streaming.py)
    val_loader: DataLoader | None
    stepper: Stepper
    # A Hugging Face model's config and tokenizer files, kept in every checkpoint (see models.hf.export_files).
    model_files: dict[str, bytes] = field(default_factory=dict)
    decay: str = "matrices"  # the optimizer's weight-decay rule (param_groups), recorded in checkpoints
    precision: Precision = field(default_factory=Precision)  # the autocast regions of a micro-batch
    chunked: bool = False  # the model computes its loss with the chunked head (launcher/chunked_loss.py)
    # The metric each of the optimizer's param groups logs its learning rate as (see param_groups.rate_keys).
    rate_keys: list[str] = field(default_factory=lambda: [param_groups.DEFAULT_RATE_KEY])
    data_ranks: int = 1  # the processes that read different batches (a tensor-parallel group reads one)
    # A validation batch's values from every data rank, each sample once (`DDP.gather_for_metrics`).
    gather: Callable[[list[torch.Tensor]], list[torch.Tensor]] | None = None

    def val_batches(self, max_batches: int | None) -> int:
        """The batches an evaluation reads."""
        n = 0 if self.val_loader is None else len(self.val_loader)
        return n if max_batches is None else min(n, max_batches)

    @property
    def streamed(self) -> bool:
        return isinstance(self.train_loader, StreamLoader)

    def train_batches(self) -> int | None:
        """Batches per epoch on each process; None for a stream, which has no length."""
        return None if self.streamed else len(self.train_loader)

    def epoch_batches(self, accelerator: Accelerator, samples_done: int, samples_per_batch: int) -> Any:
        """The epoch's batches: resuming inside an epoch, in the same order with the samples already seen skipped;
        a stream continues where its restored state stands (nothing to skip, nothing read again)."""
        if samples_done and not self.streamed:
            return accelerator.skip_first_batches(self.train_loader, samples_done // samples_per_batch)
        return self.train_loader

    def data_state(self) -> Callable[[], Any] | None:
        """What saves this process's place in a stream (None: a map-style set, placed by the trainer state)."""
        return self.train_loader.state_dict if isinstance(self.train_loader, StreamLoader) else None

    def set_epoch(self, epoch: int) -> None:
        """The epoch for the loader's shuffle and for a train set that changes with it (random block offsets).
        Accelerate passes the epoch on to the dataset only where no sampler takes it (one process, no resume), so
        the set is told here too, before the epoch's iterator (and its worker processes) starts."""
        self.train_loader.set_epoch(epoch)
        if hasattr(self.train_loader.dataset, "set_epoch"):
            self.train_loader.dataset.set_epoch(epoch)


def build(accelerator: Accelerator, recipe: Recipe, strategy: DDP, saved: dict[str, Any] | None = None) -> Parts:
    """Build in the order that fixes what the seeded RNG gives each part (datasets, model, loss, optimizer);
    `saved`: the trainer state of the checkpoint the run resumes from."""
    t = recipe.train
    # The train set may tell the model what it needs (vocab_size, num_classes); the recipe's values win.
    train_set = components.instantiate("data", recipe.data.train, key="data.train", **epoch_seed(recipe))
    val_set = components.instantiate("data", recipe.data.val, key="data.val") if recipe.data.val else None
    model = components.instantiate("model", recipe.model, **getattr(train_set, "model_kwargs", {}))
    problem = models.trainable_problem(model, recipe.model.target)
    if problem:
        raise RecipeError(problem)
    # Only the main process writes checkpoints: only it needs the files.
    model_files = (
        {**hf.export_files(model, getattr(train_set, "tokenizer", None)), **lora.files(model)}
        if accelerator.is_main_process
        else {}
    )
    loss_fn = losses.build(recipe.loss) if recipe.loss is not None else None
    # Before the strategy wraps the model: a Hugging Face model's forward is replaced for it. A tensor-parallel
    # head gathers its logits for the plain loss (the chunked one reads the whole weight).
    setting = t.chunked_loss if recipe.strategy.tp.size == 1 else False
    chunked, note = chunked_loss.choose(setting, model, loss_fn, hf.chunk_head)
    if note is not None and accelerator.is_main_process:
        accelerator.print(note)
    blocks = strategy.speed_up(accelerator, model)
    model = strategy.shard(accelerator, model, blocks)
    fused = fused_default(recipe, strategy, accelerator)
    decay = decay_rule(recipe, saved, accelerator.print)
    optimizer, rate_keys = make_optimizer(recipe, model, decay, fused)
    train_loader = make_train_loader(train_set, accelerator, recipe, strategy)
    val_loader = make_loader(val_set, recipe.eval.batch_size or t.batch_size, False, False, recipe) if val_set else None
    stream = isinstance(train_loader, StreamLoader)
    model, optimizer, prepared = strategy.prepare(accelerator, model, optimizer, None if stream else train_loader)
    train_loader = train_loader if stream else prepared
    keep_output_precision(model)  # the loop autocasts forward and loss together (see launcher/precision.py)
    if val_loader is not None:
        val_loader = accelerator.prepare(val_loader)
    stepper = strategy.stepper(accelerator, model, optimizer)
    if host_verdict(fused, accelerator):
        stepper.fused_skip = False
    precision = Precision.of(accelerator, t.mixed_precision)
    return Parts(
        model, loss_fn, optimizer, train_loader, val_loader, stepper, model_files, decay, precision, chunked, rate_keys,
        strategy.data_ranks, lambda values: strategy.gather_for_metrics(accelerator, values),
    )  # fmt: skip


def decay_rule(recipe: Recipe, saved: dict[str, Any] | None, say: Callable[[str], None]) -> str:
    """The recipe's `optimizer.decay`, or on resume the checkpoint's (its optimizer state has that rule's groups;
    one written before the rule existed has none recorded and put weight decay on every parameter)."""
    chosen = param_groups.launcher_keys(recipe.optimizer)[1]
    if saved is None or saved.get("decay", "all") == chosen:
        return chosen
    if "decay" not in saved:
        say(
            "note: this checkpoint was written with weight decay on every parameter; the resumed run keeps that "
            "(optimizer.decay=all)"
        )
        return "all"
    say(f"note: this checkpoint was written with optimizer.decay={saved['decay']}; the resumed run keeps that")
    return str(saved["decay"])


def make_optimizer(recipe: Recipe, model: torch.nn.Module, decay: str, fused: dict[str, bool]) -> tuple[Any, list[str]]:
    """The optimizer over the model's param groups (see param_groups), and the metric each group's learning rate
    is logged as; a group pattern that matches no parameter is the recipe's problem."""
    spec, _, groups = param_groups.launcher_keys(recipe.optimizer)
    problems = param_groups.unmatched((name for name, _ in model.named_parameters()), groups)
    if problems:
        raise RecipeError(problems)
    made = param_groups.groups_for(recipe.optimizer, model, decay)
    optimizer = components.instantiate("optimizer", spec, param_groups.to_torch(made), **fused)
    return optimizer, param_groups.rate_keys(made)


def fused_default(recipe: Recipe, strategy: DDP, accelerator: Accelerator) -> dict[str, bool]:
    """`fused=True` for torch's Adam, AdamW and SGD when the recipe chooses neither `fused` nor `foreach` (the HF
    Trainer's default is fused AdamW too): one kernel per step. On CUDA the skip of a non-finite update is then
    left to the optimizer on the device (`Stepper.skips_on_device`) instead of a host sync per step. On the CPU
    torch's default is one tensor at a time, a dozen operations per parameter whose dispatch dominates a small
    model's update (`foreach` measured no faster there, the fused kernel two to three times faster: see
    docs/benchmarks.md); the host keeps its verdict at every update there (`host_verdict`), as a CPU run always
    had it, and a recipe opts into the skip on the device with `optimizer.fused: true`. Not where the optimizer
    steps inside DeepSpeed's engine or is offloaded (as DeepSpeed builds its own)."""
    given = recipe.optimizer.kwargs
    if accelerator.device.type not in ("cuda", "cpu") or {"fused", "foreach"} & set(given):
        return {}
    if given.get("differentiable") or strategy.updates_in_backward or "optimizer" in strategy.offloaded():
        return {}
    return {"fused": True} if components.resolve("optimizer", recipe.optimizer.target) in fused_skipping() else {}


def host_verdict(fused: dict[str, bool], accelerator: Accelerator) -> bool:
    """Whether the launcher's own choice of a fused optimizer (`fused_default`) leaves the skip to the host: on
    the CPU, where reading the verdict costs no device sync and a run stops at the update that diverged."""
    return bool(fused) and accelerator.device.type == "cpu"


def epoch_seed(recipe: Recipe) -> dict[str, int]:
    """`train.seed` as the default `seed` of a train set that changes with the epoch (one with `set_epoch`, such as
    random block offsets), so its epochs follow the run's seed; a set that does not keeps its own default (the
    synthetic set's clusters do not move with the run's seed)."""
    changes = hasattr(components.resolve("data", recipe.data.train.target), "set_epoch")
    return {"seed": recipe.train.seed} if changes else {}


def make_train_loader(
    dataset: Dataset, accelerator: Accelerator, recipe: Recipe, strategy: DDP
) -> DataLoader | StreamLoader:
    """The train set's loader; a stream is told this process's share (its data rank's), its shuffle and seed (see
    data/streaming.py)."""
    t = recipe.train
    if isinstance(dataset, TokenStream):
        rank = strategy.data_rank(accelerator.process_index)
        dataset.share(rank, strategy.data_ranks, recipe.data.shuffle, t.seed)
        return StreamLoader(dataset, t.batch_size, recipe.data.num_workers, accelerator.device, t.seed)
    return make_loader(dataset, t.batch_size, recipe.data.shuffle, recipe.data.drop_last, recipe)


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
        # Workers kept across epochs would keep their copy of a set that changes with the epoch; such a set gets
        # new workers each epoch, made after it was told the epoch.
        persistent_workers=recipe.data.num_workers > 0 and not changes_with_epoch(dataset),
    )


def changes_with_epoch(dataset: Dataset) -> bool:
    """Whether a set reads other samples in other epochs: one with `set_epoch` does, unless it says its epochs are
    alike (`epochs_differ`: the built-in text sets with fixed block offsets)."""
    return hasattr(dataset, "set_epoch") and getattr(dataset, "epochs_differ", True)


@dataclass
class Begin:
    """Where the run begins: its state (a checkpoint's, when it resumes), what that checkpoint saved, the run's
    budget of updates and the learning-rate schedule over it."""

    state: TrainState
    saved: dict[str, Any] | None
    budget: plan.Budget
    scheduler: Any

    def same_world(self, layout: dict[str, int]) -> bool:
        return self.saved is not None and same_layout(self.saved, layout)


def same_layout(saved: dict[str, Any], layout: dict[str, int]) -> bool:
    """Whether a checkpoint was written by processes that split the work as this run's do (`DDP.layout`): the same
    number, reading the same shares of the data (a checkpoint from before tensor parallelism: every process one)."""
    return recorded_split(saved, layout["world_size"]) == (layout["world_size"], layout["data_ranks"])


def begin(
    accelerator: Accelerator,
    recipe: Recipe,
    strategy: DDP,
    parts: Parts,
    resume_from: Path | None,
    saved: dict[str, Any] | None,
) -> Begin:
    """The state, budget and schedule; a checkpoint to resume from (`saved`: its trainer state) is loaded into
    the parts."""
    t, world = recipe.train, strategy.data_ranks
    samples_per_batch = t.batch_size * world
    state, saved = starting_state(recipe, saved, world, samples_per_batch)
    global_batch = samples_per_batch * t.gradient_accumulation_steps
    budget = plan.budget(
        parts.train_batches() or 0, t.gradient_accumulation_steps, global_batch, t.max_steps, t.max_epochs, saved
    )
    state.schedule_total, state.schedule_batch = budget.schedule_total, budget.schedule_batch
    state.decay = parts.decay
    scheduler = make_scheduler(recipe, parts.stepper.optimizer, budget)
    if resume_from is not None and saved is not None:
        resume(accelerator, resume_from, parts, scheduler, strategy, saved, state, budget)
    return Begin(state, saved, budget, scheduler)


def starting_state(
    recipe: Recipe, saved: dict[str, Any] | None, world: int, samples_per_batch: int
) -> tuple[TrainState, dict[str, Any] | None]:
    """The state a run starts from, and what its checkpoint saved (None for a new run)."""
    es = recipe.early_stopping
    state = TrainState(early_stopping=Tracker(**({} if es is None else {"mode": es.mode, "min_delta": es.min_delta})))
    if saved is None:
        return state, None
    state = TrainState.from_state_dict(saved)
    if recorded_split(saved, world)[1] != world:
        # Another world size splits the epoch into other global batches: continue at the last whole one.
        state.samples_in_epoch = state.samples_in_epoch // samples_per_batch * samples_per_batch
    return state, {**saved, "batches_done": state.samples_in_epoch // samples_per_batch}


def make_scheduler(recipe: Recipe, optimizer: torch.optim.Optimizer, budget: plan.Budget) -> Any:
    """A built-in schedule becomes a LambdaLR over its pure function, at the budget's position for each update;
    any other is built with the optimizer."""
    spec = recipe.scheduler
    if spec.short_name in schedules.SCHEDULES:
        factor = schedules.build(spec.short_name, budget.schedule_total, **dict(spec.kwargs))
        # A plain function, not an object: LambdaLR's state dict would carry an object's attributes.
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: factor(budget.position(step)))
    return components.instantiate("scheduler", spec, optimizer)


def resume(
    accelerator: Accelerator,
    path: Path,
    parts: Parts,
    scheduler: Any,
    strategy: DDP,
    saved: dict[str, Any],
    state: TrainState,
    budget: plan.Budget,
) -> None:
    """Load the checkpoint into the built run, and say what a resume on another number of processes changes."""
    checkpoint.load(accelerator, path, parts.model, parts.optimizer, scheduler, strategy.checkpoint_format)
    changed = adapters.base_change(path, parts.model)
    if changed:
        accelerator.print(changed)
    match_fused(parts.stepper.inner)
    same_world = same_layout(saved, strategy.layout())
    stream_note = resume_stream(accelerator, path, parts, same_world) if parts.streamed else None
    accelerator.print(f"resumed from {strategy.recipe.checkpoint_name(path)} at step {state.step}")
    if not same_world:
        note = world_change_note(saved, state, budget, strategy, stream_note)
        accelerator.print(note)
    elif stream_note:
        accelerator.print(f"note: {stream_note}")


def resume_stream(accelerator: Accelerator, path: Path, parts: Parts, same_world: bool) -> str | None:
    """Put this process's stream where the checkpoint left it. Another number of processes splits the stream into
    other shares, which no saved position fits: each starts its share at the start of the earliest pass a process
    was in. What that changes, for the warning (None: exact)."""
    loader = parts.train_loader
    assert isinstance(loader, StreamLoader)
    states = checkpoint.data_states(path)
    if states is None:  # written by a run whose train set was not a stream
        loader.restart(0)
        return "the checkpoint holds no stream position: the stream starts at its beginning"
    if same_world:
        loader.load_state_dict(states[accelerator.process_index])
        return None
    start = min((p for p in map(saved_pass, states) if p is not None), default=0)
    loader.restart(start)
    return (
        f"the stream cannot continue at the saved positions (each process's share of it depends on their number): "
        f"every process starts its new share at the start of pass {start}, so blocks of that pass are seen again"
    )


def world_change_note(
    saved: dict[str, Any], state: TrainState, budget: plan.Budget, strategy: DDP, stream: str | None = None
) -> str:
    """What a resume on another number of processes (or another split of them) keeps and what it changes, in one
    line (`stream`: what it changes for a streamed train set)."""
    recipe, world = strategy.recipe, strategy.processes
    saved_world, saved_ranks = recorded_split(saved, world)
    how = (
        f"the epoch budget is kept: {budget.total_steps - state.step} updates of "
        f"{recipe.train.batch_size * strategy.data_ranks * recipe.train.gradient_accumulation_steps} samples "
        f"remain, and the learning-rate schedule follows the samples trained"
        if budget.remapped
        else "the model, optimizer and schedule are exact"
    )
    if budget.remapped and recipe.scheduler.short_name not in schedules.SCHEDULES:
        how += f" (but {recipe.scheduler.target} counts updates: its curve is stretched to the new count)"
    fresh = f"; processes beyond {saved_world} start from fresh RNG states" if saved_world < world else ""
    data = stream or (
        f"the data continues at sample {state.samples_in_epoch} of epoch {state.epoch} (saved at "
        f"{saved.get('samples_in_epoch')})"
    )
    written, now = _processes(saved_world, saved_ranks), _processes(world, strategy.data_ranks)
    return f"warning: written by {written}, resumed by {now}: {how}; {data}{fresh}"


def _processes(processes: int, data_ranks: int) -> str:
    """`4 processes`, or with tensor parallelism `4 processes (2 data ranks x 2 tensor-parallel)`."""
    return f"{processes} process{'es' if processes != 1 else ''}{mesh_text(processes, data_ranks)}"
