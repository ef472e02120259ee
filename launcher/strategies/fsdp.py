"""FSDP2 (`fully_shard`): parameters, gradients and optimizer state sharded across processes.

Applied by the launcher itself, on CPU (over gloo) and GPU alike, so Accelerate only runs the process group;
checkpoints are torch's distributed checkpoint (DCP), every process writing its shard.
"""

from __future__ import annotations

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

    def autocast_precision(self) -> str:
        # Sharded, FSDP computes in bf16 through its MixedPrecisionPolicy, not autocast.
        return "no" if self.shards else self.recipe.train.mixed_precision

    def shard(self, accelerator: Accelerator, model: torch.nn.Module, blocks: list[torch.nn.Module]) -> torch.nn.Module:
        import torch

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

    def prepare(
        self, accelerator: Accelerator, model: torch.nn.Module, optimizer: Any, train: DataLoader
    ) -> tuple[torch.nn.Module, Any, DataLoader]:
        if not self.shards:
            return accelerator.prepare(model, optimizer, train)
        optimizer, train = accelerator.prepare(optimizer, train)  # already sharded: Accelerate would wrap it in DDP
        return model, optimizer, train

    def stepper(self, accelerator: Accelerator, model: torch.nn.Module, optimizer: Any) -> Stepper:
        from launcher.strategies.stepping import ShardedStepper, Stepper

        return ShardedStepper(accelerator, model, optimizer) if self.shards else Stepper(accelerator, model, optimizer)

    def problems(self) -> list[str]:
        if self.recipe.train.mixed_precision == "fp16":
            return ["train.mixed_precision: fp16 is not supported with strategy.name=fsdp; use bf16"]
        return []

    def how(self) -> str:
        f, names = self.recipe.strategy.fsdp, self.recipe.train.blocks or self.recipe.strategy.fsdp.wrap
        return (
            f"fsdp (FSDP2 fully_shard; units: {', '.join(names) or 'the blocks the model declares'}; "
            f"reshard after forward {'on' if f.reshard_after_forward else 'off'}"
            f"{'; CPU offload' if f.cpu_offload else ''})"
        )

    def memory(self, parameters: int, slots: int) -> dict[str, float]:
        n = max(self.processes, 1)
        return {k: v / n for k, v in state_bytes(parameters, slots, half_master=False).items()}

    def offloaded(self) -> set[str]:
        return {"parameters", "gradients", "optimizer"} if self.recipe.strategy.fsdp.cpu_offload else set()


def fsdp_shard(
    model: torch.nn.Module, units: list[torch.nn.Module], recipe: Recipe, device: torch.device
) -> torch.nn.Module:
    """Apply FSDP2's `fully_shard` to each of the run's blocks (`units`: from `train.blocks`, `strategy.fsdp.wrap`
    or the model's declaration, see `blocks.run_blocks`), then to the root (which holds the rest)."""
    import torch
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    cfg = recipe.strategy.fsdp
    model.to(device)
    options: dict[str, Any] = {"reshard_after_forward": cfg.reshard_after_forward}
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
