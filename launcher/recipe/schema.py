"""The recipe's schema: frozen dataclasses of plain values, one per section, and how a recipe is written back out.

Nothing here reads or checks a recipe (see `dialect`, `build` and `checks`); other modules (strategies, the loop)
import the types from here without pulling in the rest.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from launcher.components import Component
from launcher.layout import CHECKPOINTS_DIR, is_url

MISSING = "???"  # a value the user must give, on the command line or in a recipe that inherits this one


@dataclass(frozen=True)
class DataConfig:
    """`dataset` holds arguments shared by both splits; `train` and `val` are merged on top of it."""

    train: Component
    val: Component | None = None
    num_workers: int = 0
    shuffle: bool = True
    drop_last: bool = False


@dataclass(frozen=True)
class CompileConfig:
    """`train.compile`: `false` (the default), `true`, or these keys (a mapping of them turns compilation on)."""

    enabled: bool = True
    regional: bool = True  # compile each block (train.blocks) on its own: seconds, not minutes; false: the whole model
    mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    fullgraph: bool = False  # fail on a graph break instead of running that part eagerly
    dynamic: bool | None = None  # None: torch decides (it recompiles for a new shape, then marks it dynamic)
    backend: str = "inductor"

    @classmethod
    def shorthand(cls, value: Any) -> dict[str, Any] | None:
        return {"enabled": value} if isinstance(value, bool) else None

    def plain(self) -> Any:
        if not self.enabled:
            return False
        return True if self == CompileConfig() else {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclass(frozen=True)
class Recompute:
    """`train.activation_checkpointing`: `none`, `full` (every block) or `{every: k}` (every k-th block)."""

    every: int = 0  # 0: no block is recomputed; 1: every block; k: blocks 0, k, 2k, ...

    @classmethod
    def shorthand(cls, value: Any) -> dict[str, Any] | None:
        return {"none": {"every": 0}, "full": {"every": 1}}.get(value) if isinstance(value, str) else None

    def plain(self) -> Any:
        return {0: "none", 1: "full"}.get(self.every, {"every": self.every})


@dataclass(frozen=True)
class TrainConfig:
    max_steps: int | None = None
    max_epochs: int | None = None
    batch_size: int = 32
    gradient_accumulation_steps: int = 1
    clip_grad_norm: float | None = 1.0
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    seed: int = 0
    max_nonfinite_steps: int = 3  # consecutive skipped updates (non-finite loss or gradient) before the run stops
    max_time_s: float | None = None  # wall-time budget: stop, on every rank at the same step, once it is spent
    compile: CompileConfig = CompileConfig(enabled=False)
    activation_checkpointing: Recompute = Recompute()
    blocks: tuple[str, ...] = ()  # the model's repeated block classes; empty: the model's `_no_split_modules`
    peak_flops: float | None = None  # FLOP/s of one device that MFU is measured against (None: the GPU table's)
    # A causal LM's output projection and cross-entropy in chunks of tokens, never all the logits at once (see
    # launcher/chunked_loss.py); auto: where the vocabulary is large and the loss plain cross-entropy.
    chunked_loss: Literal["auto", True, False] = "auto"


@dataclass(frozen=True)
class EvalConfig:
    every_steps: int | None = None
    every_epoch: bool = True
    max_batches: int | None = None
    batch_size: int | None = None


@dataclass(frozen=True)
class EarlyStoppingConfig:
    monitor: str = "val/loss"
    mode: Literal["min", "max"] = "min"
    patience: int = 5
    min_delta: float = 0.0


@dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int | None = None
    save_final: bool = True
    keep_last: int = 3
    keep_best: int = 0  # also keep this many step checkpoints with the best `monitor`
    async_save: bool = False  # write in a background thread: training waits for a copy in memory, not the disk
    monitor: str = "val/loss"
    mode: Literal["min", "max"] = "min"
    dir: str | None = None


@dataclass(frozen=True)
class LoggingConfig:
    every_steps: int = 10
    trackers: tuple[str, ...] = ("tensorboard", "jsonl")
    progress_bar: bool = True


@dataclass(frozen=True)
class FSDPConfig:
    """FSDP2 (`fully_shard`): parameters, gradients and optimizer state sharded across processes."""

    wrap: tuple[str, ...] = ()  # module classes sharded as units of their own (e.g. Block); the root always is one
    reshard_after_forward: bool = True  # free gathered parameters after forward (less memory, one more all-gather)
    activation_checkpointing: bool = False  # recompute each `wrap` unit's activations in backward
    cpu_offload: bool = False  # keep sharded parameters, gradients and optimizer state in host memory


@dataclass(frozen=True)
class DeepSpeedConfig:
    zero_stage: Literal[1, 2, 3] = 2
    offload_optimizer: bool = False  # optimizer state and step on the CPU (ZeRO-Offload)
    offload_params: bool = False  # parameters in host memory between uses (ZeRO-3 only)
    config: str | None = None  # a DeepSpeed JSON file merged into the config generated from the recipe


# How a module's weights split over a tensor-parallel group (launcher/strategies/tensor_parallel.py).
TPStyle = Literal["colwise", "rowwise", "colwise_gather"]


@dataclass(frozen=True)
class TensorParallelConfig:
    """`strategy.tp`: tensor parallelism within groups of `size` processes, FSDP2 across the groups (a 2-D mesh of
    processes / size data-parallel ranks x size). A number is the size."""

    size: int = 1
    # Module-name patterns (fnmatch, e.g. `blocks.*.attn.q`) and how each splits; empty: the model's own plan.
    plan: dict[str, TPStyle] = field(default_factory=dict)

    @classmethod
    def shorthand(cls, value: Any) -> dict[str, Any] | None:
        return {"size": value} if isinstance(value, int) and not isinstance(value, bool) else None

    def plain(self) -> Any:
        return self.size if not self.plan else {"size": self.size, "plan": dict(self.plan)}


@dataclass(frozen=True)
class StrategyConfig:
    name: Literal["ddp", "fsdp", "deepspeed"] = "ddp"
    find_unused_parameters: bool = False  # ddp
    timeout_s: float = 1800.0  # how long a collective waits for a peer before the run gives up on it
    fsdp: FSDPConfig = FSDPConfig()
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    tp: TensorParallelConfig = TensorParallelConfig()


@dataclass(frozen=True)
class SlurmConfig:
    """Defaults for `launcher slurm submit` (its flags win)."""

    nodes: int = 1
    gpus_per_node: int = 0
    time: str = "01:00:00"
    partition: str | None = None
    account: str | None = None
    max_requeues: int = 3  # times a job stopped by SLURM's warning or the stop file requeues itself
    max_restarts: int = 0  # times the job's processes are restarted after a failure, within one attempt
    signal_before_s: int = 120  # SLURM warns the job (SIGUSR1) this long before its end
    stop_before_end_s: int = 0  # stop and save this long before the job's end even without a signal (0: off)
    sbatch: tuple[str, ...] = ()  # further sbatch options, e.g. ["--qos=high", "--constraint=h100"]
    setup: tuple[str, ...] = ()  # shell lines run first in the job: module load ..., source .venv/bin/activate


@dataclass(frozen=True)
class ProfileConfig:
    """torch.profiler traces of a few updates, one file per traced rank in `<run_dir>/profile/`."""

    start_step: int = 5  # the first update recorded (as logged: the first update is 1); past warm-up and compiling
    steps: int = 3  # updates recorded
    warmup: int = 1  # updates just before start_step that the profiler runs without recording
    ranks: tuple[int, ...] | Literal["all"] = (0,)  # the ranks that trace, or all
    memory: bool = False  # tensor allocations and shapes; on CUDA also a memory snapshot (pytorch.org/memory_viz)
    with_stack: bool = False  # the Python stack of every op (larger traces)


@dataclass(frozen=True, kw_only=True)
class Recipe:
    name: str = ""
    run_dir: str = ""
    resume: str = "none"
    model: Component
    data: DataConfig
    loss: Component | None = None  # None: the model's own loss where it computes one (Hugging Face), else cross-entropy
    optimizer: Component
    scheduler: Component = Component("constant")
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    early_stopping: EarlyStoppingConfig | None = None
    checkpoint: CheckpointConfig = CheckpointConfig()
    logging: LoggingConfig = LoggingConfig()
    strategy: StrategyConfig = StrategyConfig()
    slurm: SlurmConfig = SlurmConfig()
    profile: ProfileConfig | None = None

    @property
    def checkpoint_dir(self) -> Path:
        """Where checkpoints are written on this machine: with a storage URL, the staging folder they are built
        in before they are uploaded."""
        if self.checkpoint.dir and not self.checkpoint_store:
            return Path(self.checkpoint.dir)
        return Path(self.run_dir) / CHECKPOINTS_DIR

    @property
    def checkpoint_store(self) -> str | None:
        """`checkpoint.dir` where it is a storage URL (`s3://bucket/prefix`), else None."""
        return self.checkpoint.dir if self.checkpoint.dir and is_url(self.checkpoint.dir) else None

    def checkpoint_name(self, path: Path) -> str:
        """How a checkpoint is named to the user: by its URL where checkpoints are in a store (`path` is then
        its copy in the staging folder)."""
        return f"{self.checkpoint_store.rstrip('/')}/{path.name}" if self.checkpoint_store else str(path)

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML-ready values: what `--print-recipe` prints and the run dir keeps."""
        return _plain(self)


TRACKERS = ("jsonl", "tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive")
BUILT_IN_TRACKERS = ("jsonl", "tensorboard")  # the others are their own packages, installed by the user


def _plain(value: Any) -> Any:
    if hasattr(value, "plain"):  # a section with a shorthand writes itself back as the user would
        return value.plain()
    if isinstance(value, Component):
        return value.to_dict()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def dump(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)
