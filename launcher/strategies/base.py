"""The plain strategy, DDP, and the interface every strategy keeps: what differs between strategies lives in
their objects, and the loop, the checkpoint writer and `plan` ask the object.

DDP: every process holds the whole model and optimizer; Accelerate wraps the model in DistributedDataParallel
(nothing with one process) and the main process alone writes checkpoints.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from datetime import timedelta
from typing import TYPE_CHECKING, Any, ClassVar

from launcher.errors import say
from launcher.strategies.memory import gib, state_bytes

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator
    from torch.utils.data import DataLoader

    from launcher.recipe.schema import Recipe
    from launcher.strategies.stepping import Stepper


class DDP:
    """Data parallel: the base of the other strategies, which override what they do differently."""

    name: ClassVar[str] = "ddp"
    checkpoint_format: ClassVar[str] = "full"  # a format of `launcher.checkpoint.FORMATS`
    # Whether each process holds only its shard of the training state (and writes it in checkpoints): replicas'
    # checksums are then different by design, and only synchronous saves are possible.
    sharded: ClassVar[bool] = False
    # Whether the optimizer update happens inside backward (before the loop's verdict on the step): after
    # divergence the state is then no longer the last good one.
    updates_in_backward: ClassVar[bool] = False
    launch_flag: ClassVar[str | None] = None  # the variable `accelerate launch --use_<name>` sets
    section: ClassVar[str | None] = None  # its options' section of the recipe's `strategy:`

    def __init__(self, recipe: Recipe, processes: int):
        self.recipe = recipe
        self.processes = processes  # the processes launched (WORLD_SIZE)

    @property
    def data_ranks(self) -> int:
        """The processes that read different batches: all of them, unless a tensor-parallel group reads one."""
        return self.processes

    def data_rank(self, process_index: int) -> int:
        """Which share of the data a process reads (consecutive processes form a tensor-parallel group)."""
        return process_index // (self.processes // self.data_ranks)

    def layout(self) -> dict[str, int]:
        """How the processes split the work, as a checkpoint records it (see `build.same_layout`)."""
        return {"world_size": self.processes, "data_ranks": self.data_ranks}

    def world_problems(self) -> list[str]:
        """What the strategy cannot do with the number of processes launched, `key: message` each."""
        return []

    # ------------------------------------------------------------------------------------------------ running

    @contextlib.contextmanager
    def process_setup(self) -> Iterator[None]:
        """What this process needs set while the strategy runs (environment, warning filters); undone after."""
        yield

    def accelerator(self, resumed_world: int | None) -> Accelerator:
        """The Accelerator the strategy runs on; `resumed_world`: the processes that wrote the checkpoint this run
        resumes from (None: a new run)."""
        import torch
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

        cuda = torch.cuda.is_available()
        return Accelerator(
            cpu=not cuda,
            # On CPU, models and batches are where they belong already: placing them would only cost time per batch.
            device_placement=cuda,
            mixed_precision=self.autocast_precision(),
            kwargs_handlers=[
                DistributedDataParallelKwargs(find_unused_parameters=self.recipe.strategy.find_unused_parameters),
                InitProcessGroupKwargs(timeout=self.timeout()),
            ],
            **self.accelerator_options(),
        )

    def autocast_precision(self) -> str:
        return self.recipe.train.mixed_precision

    def timeout(self) -> timedelta:
        return timedelta(seconds=self.recipe.strategy.timeout_s)

    def accelerator_options(self) -> dict[str, Any]:
        """The Accelerator arguments every strategy shares."""
        import torch
        from accelerate import DataLoaderConfiguration
        from accelerate.utils import ProjectConfiguration

        r, t = self.recipe, self.recipe.train
        # On CUDA a batch (in pinned memory: see build.make_loader) is copied without the host waiting for it.
        loaders = DataLoaderConfiguration(
            use_seedable_sampler=True, data_seed=t.seed, non_blocking=torch.cuda.is_available()
        )
        return {
            "gradient_accumulation_steps": t.gradient_accumulation_steps,
            "project_config": ProjectConfiguration(project_dir=r.run_dir, logging_dir=r.run_dir),
            "dataloader_config": loaders,
            "step_scheduler_with_optimizer": False,
        }

    def speed_up(self, accelerator: Accelerator, model: torch.nn.Module) -> list[torch.nn.Module]:
        """Activation checkpointing and compilation of the model's blocks, in place, before `shard` (FSDP2 shards
        blocks already checkpointed and compiled, as torchtitan does) and before DDP's wrapper; the blocks."""
        from launcher import blocks

        found = blocks.run_blocks(model, self.recipe)
        every = blocks.recompute_every(self.recipe)
        if every:
            count = blocks.checkpoint_blocks(found, every)
            self.note(accelerator, f"activation checkpointing: {count} of {len(found)} blocks recompute in backward")
        if self.recipe.train.compile.enabled:
            self.compile(accelerator, model, found)
        return found

    def compile(self, accelerator: Accelerator, model: torch.nn.Module, found: list[torch.nn.Module]) -> None:
        from launcher import compiling

        what = compiling.compile_in_place(model, found, self.recipe.train.compile)
        self.note(accelerator, f"compiling {what}: the first update includes it")

    @staticmethod
    def note(accelerator: Accelerator, line: str) -> None:
        if accelerator.is_main_process:
            say(f"note: {line}")

    def shard(self, accelerator: Accelerator, model: torch.nn.Module, blocks: list[torch.nn.Module]) -> torch.nn.Module:
        """The model as built, spread over the processes where the strategy does that itself (before the
        optimizer is built on its parameters); `blocks`: its blocks (see `speed_up`)."""
        return model

    def prepare(
        self, accelerator: Accelerator, model: torch.nn.Module, optimizer: Any, train: DataLoader
    ) -> tuple[torch.nn.Module, Any, DataLoader]:
        """Model, optimizer and train loader as the strategy runs them (wrapped, placed, sharded)."""
        return accelerator.prepare(model, optimizer, train)

    def gather_for_metrics(self, accelerator: Accelerator, values: list[torch.Tensor]) -> list[torch.Tensor]:
        """Every data rank's values of a validation batch, each sample once (Accelerate's padding dropped)."""
        return accelerator.gather_for_metrics(values)

    def stepper(self, accelerator: Accelerator, model: torch.nn.Module, optimizer: Any) -> Stepper:
        from accelerate.utils import DistributedType

        from launcher.strategies.stepping import Stepper

        plain = (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)
        direct = accelerator.scaler is None and accelerator.distributed_type in plain
        return Stepper(accelerator, model, optimizer, direct=direct, device_skips=not self.updates_in_backward)

    # ------------------------------------------------------------------------------------------------ planning

    def problems(self) -> list[str]:
        """What this strategy cannot do with the recipe, each `key.path: message` (see recipe checks)."""
        return []

    def how(self) -> str:
        """The strategy in a few words, for `launcher plan`."""
        return "ddp (every process holds the whole model and optimizer)"

    def memory(self, parameters: int, slots: int) -> dict[str, float]:
        """Bytes of parameters, gradients and optimizer state each process holds in steady state."""
        return state_bytes(parameters, slots, half_master=False)

    def offloaded(self) -> set[str]:
        """Which parts of the training state live in host memory."""
        return set()

    def describe(self, parameters: int | None, slots: int, model: torch.nn.Module | None = None) -> list[str]:
        """The lines `launcher plan` shows of the strategy: how, parameters, memory per process (`model`: built on
        the meta device, where it builds there)."""
        lines = [f"strategy      {self.how()}"]
        if parameters is not None:
            mem, cpu = self.memory(parameters, slots), self.offloaded()
            parts = ", ".join(f"{name} {gib(b)}{' (CPU)' if name in cpu else ''}" for name, b in mem.items())
            lines.append(f"parameters    {parameters:,} ({gib(parameters * 4)} in fp32)")
            lines.append(
                f"memory        per process: {parts} = {gib(sum(mem.values()))} "
                f"(optimizer with {slots} state tensors per parameter; activations and buffers not counted)"
            )
        return lines


def launch_flag_set(env: Mapping[str, str], variable: str | None) -> bool:
    return variable is not None and env.get(variable, "").lower() in ("1", "true", "yes")
