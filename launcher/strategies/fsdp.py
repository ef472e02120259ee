"""FSDP2 (`fully_shard`): parameters, gradients and optimizer state sharded across processes; with `strategy.tp`,
tensor parallelism within groups of processes and FSDP2 across the groups, on a 2-D device mesh.

Applied by the launcher itself, on CPU (over gloo) and GPU alike, so Accelerate only runs the process group;
checkpoints are torch's distributed checkpoint (DCP), every process writing its shard. DCP records each tensor's
global shape and every shard's place in it, so a checkpoint loads on any mesh: 2 x 2 into 4 x 1, 1 x 4 or one
process.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from launcher.errors import say
from launcher.strategies.base import DDP
from launcher.strategies.memory import state_bytes

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator
    from torch.utils.data import DataLoader

    from launcher.recipe.schema import Recipe
    from launcher.strategies.stepping import Stepper


class FSDP(DDP):
    name = "fsdp"
    checkpoint_format = "dcp"
    sharded = True
    section = "fsdp"
    launch_flag = "ACCELERATE_USE_FSDP"

    def __init__(self, recipe: Recipe, processes: int):
        super().__init__(recipe, processes)
        self.shards = processes > 1  # one process: nothing to shard (and autocast computes in bf16)
        self.tp = recipe.strategy.tp.size
        self.mesh: Any = None  # the 2-D device mesh (data ranks x tensor-parallel ranks), with strategy.tp
        self.split_parameters = 0  # of the model's parameters, those strategy.tp splits (for `launcher plan`)

    @contextlib.contextmanager
    def process_setup(self) -> Iterator[None]:
        """The gathered logits of a tensor-parallel head are a view, which FSDP2 warns of at every forward in
        case the caller changes them in place: the loop never does."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "FSDP2-wrapped module .* returned a view tensor", UserWarning)
            yield

    @property
    def data_ranks(self) -> int:
        tp = self.tp if self.processes % self.tp == 0 else 1
        return self.processes // tp

    def world_problems(self) -> list[str]:
        if self.processes % self.tp:
            return [
                f"strategy.tp.size: {self.tp} must divide the number of processes, {self.processes}: launch a "
                f"multiple of {self.tp} processes, or set strategy.tp.size to a divisor of {self.processes}"
            ]
        return []

    def autocast_precision(self) -> str:
        # Sharded, FSDP computes in bf16 through its MixedPrecisionPolicy, not autocast.
        return "no" if self.shards else self.recipe.train.mixed_precision

    def shard(self, accelerator: Accelerator, model: torch.nn.Module, blocks: list[torch.nn.Module]) -> torch.nn.Module:
        import torch

        if self.tp > 1:
            return self.shard_on_mesh(accelerator, model, blocks)
        if not self.shards:
            if accelerator.is_main_process:
                say("note: strategy fsdp with one process: nothing to shard; checkpoints are still DCP")
            return model
        if accelerator.is_main_process and not torch.cuda.is_available():
            say(
                "note: strategy fsdp on CPU: Accelerate's FSDP needs a GPU, so the model is sharded with torch's "
                "fully_shard over gloo, as the launcher does on GPUs too"
            )
        return fsdp_shard(model, blocks, self.recipe, accelerator.device)

    def shard_on_mesh(
        self, accelerator: Accelerator, model: torch.nn.Module, blocks: list[torch.nn.Module]
    ) -> torch.nn.Module:
        """Tensor parallelism within each group of `tp` consecutive ranks, then FSDP2 across the groups (over one
        group too: its mixed precision and gradient handling are then the same on every mesh)."""
        from torch.distributed.device_mesh import init_device_mesh

        from launcher.strategies import tensor_parallel

        self.mesh = init_device_mesh(
            accelerator.device.type, (self.data_ranks, self.tp), mesh_dim_names=("dp_shard", "tp")
        )
        # Accelerate splits the batches over the mesh's data ranks only (a tensor-parallel group reads the same
        # batch) when it finds the mesh here, as its own ParallelismConfig leaves it.
        accelerator.state.device_mesh = self.mesh
        model.to(accelerator.device)
        tensor_parallel.apply(model, self.mesh["tp"], self.recipe)
        return fsdp_shard(model, blocks, self.recipe, accelerator.device, self.mesh["dp_shard"])

    def gather_for_metrics(self, accelerator: Accelerator, values: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.mesh is None:
            return accelerator.gather_for_metrics(values)
        # Rank order is data rank major, tensor-parallel rank minor; a group's ranks hold the same samples.
        firsts = [
            g.reshape(self.data_ranks, self.tp, -1, *g.shape[1:])[:, 0].flatten(0, 1)
            for g in accelerator.gather(values)
        ]
        state = accelerator.gradient_state  # what Accelerate's gather_for_metrics reads: padding at the end
        if state.end_of_dataloader and state.remainder > 0:
            firsts = [g[: state.remainder] for g in firsts]
        return firsts

    def prepare(
        self, accelerator: Accelerator, model: torch.nn.Module, optimizer: Any, train: DataLoader
    ) -> tuple[torch.nn.Module, Any, DataLoader]:
        if not self.shards:
            return accelerator.prepare(model, optimizer, train)
        optimizer, train = accelerator.prepare(optimizer, train)  # already sharded: Accelerate would wrap it in DDP
        return model, optimizer, train

    def stepper(self, accelerator: Accelerator, model: torch.nn.Module, optimizer: Any) -> Stepper:
        from launcher.strategies.stepping import MeshStepper, ShardedStepper, Stepper

        if self.mesh is not None:
            return MeshStepper(accelerator, model, optimizer)
        return ShardedStepper(accelerator, model, optimizer) if self.shards else Stepper(accelerator, model, optimizer)

    def problems(self) -> list[str]:
        t, problems = self.recipe.train, []
        if t.mixed_precision == "fp16":
            problems.append("train.mixed_precision: fp16 is not supported with strategy.name=fsdp; use bf16")
        if self.tp > 1 and self.recipe.strategy.fsdp.cpu_offload:
            problems.append("strategy.fsdp.cpu_offload: not yet with strategy.tp; set it to false")
        if self.tp > 1 and self.recipe.model.kwargs.get("lora"):
            problems.append("model.lora: not yet with strategy.tp (the adapters would wrap the split layers)")
        if self.tp > 1 and t.compile.enabled:
            problems.append(
                "train.compile: not yet with strategy.tp (tensor-parallel modules run eagerly); set it to false"
            )
        if self.tp > 1 and t.chunked_loss is True:
            problems.append(
                "train.chunked_loss: not with strategy.tp (the output head is split by vocabulary and its logits "
                "gathered for the loss); set it to auto or false"
            )
        return problems

    def how(self) -> str:
        f, names = self.recipe.strategy.fsdp, self.recipe.train.blocks or self.recipe.strategy.fsdp.wrap
        return (
            f"fsdp (FSDP2 fully_shard; units: {', '.join(names) or 'the blocks the model declares'}; "
            f"reshard after forward {'on' if f.reshard_after_forward else 'off'}"
            f"{'; CPU offload' if f.cpu_offload else ''}"
            f"{f'; tensor parallelism in groups of {self.tp}' if self.tp > 1 else ''})"
        )

    def memory(self, parameters: int, slots: int) -> dict[str, float]:
        # With strategy.tp, what the plan splits is spread over every process, the rest over the data ranks.
        split = self.split_parameters if self.tp > 1 else parameters
        whole, spread = state_bytes(parameters - split, slots, False), state_bytes(split, slots, False)
        return {k: spread[k] / max(self.processes, 1) + whole[k] / self.data_ranks for k in whole}

    def describe(self, parameters: int | None, slots: int, model: torch.nn.Module | None = None) -> list[str]:
        if self.tp == 1 or model is None:
            return super().describe(parameters, slots, model)
        from launcher.strategies import tensor_parallel

        self.split_parameters = tensor_parallel.split_parameters(model, self.recipe)
        return [
            *super().describe(parameters, slots, model),
            *tensor_parallel.describe(model, self.recipe, self.data_ranks),
        ]

    def offloaded(self) -> set[str]:
        return {"parameters", "gradients", "optimizer"} if self.recipe.strategy.fsdp.cpu_offload else set()


def fsdp_shard(
    model: torch.nn.Module, units: list[torch.nn.Module], recipe: Recipe, device: torch.device, mesh: Any = None
) -> torch.nn.Module:
    """Apply FSDP2's `fully_shard` to each of the run's blocks (`units`: from `train.blocks`, `strategy.fsdp.wrap`
    or the model's declaration, see `blocks.run_blocks`), then to the root (which holds the rest); over `mesh`
    (None: every process)."""
    import torch
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    cfg = recipe.strategy.fsdp
    model.to(device)
    options: dict[str, Any] = {"reshard_after_forward": cfg.reshard_after_forward, "mesh": mesh}
    if recipe.train.mixed_precision == "bf16":
        # Compute and all-gather in bf16; gradients are reduced and the sharded master weights kept in fp32.
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if cfg.cpu_offload:
        # (Pinned host memory needs CUDA; on a CPU-only machine the shards stay where they are anyway.)
        options["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
    for unit in units:
        fully_shard(unit, **options)
    fully_shard(model, **options)
    return model
