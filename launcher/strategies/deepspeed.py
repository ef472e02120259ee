"""DeepSpeed ZeRO (stages 1-3, optional CPU offload): the engine owns backward, clipping and the update, which
it applies inside backward; checkpoints are its own ZeRO partitions, every process writing its own.

The config is generated from the recipe (batch sizes, accumulation, clipping, precision cannot disagree) with a
user's JSON merged in for everything else.

DeepSpeed compiles its C++ ops on first use (torch's cpp_extension, into TORCH_EXTENSIONS_DIR or
~/.cache/torch_extensions), a minute or more each, under a lock file in the op's build folder that every other
process waits on, silently and for ever where a killed build left it. The CPU's shared-memory all-reduce, built by
every CPU run, serves inference alone and is left out (`skip_inference_comm_op`); any other build a run waits on
(ZeRO-Offload's `cpu_adam`, GPU ops) is named within seconds and given up after `strategy.timeout_s`
(`extensions.build_lock_watch`).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from launcher.extensions import build_lock_watch
from launcher.recipe.dialect import deep_merge
from launcher.strategies.base import DDP
from launcher.strategies.memory import state_bytes

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator
    from torch.utils.data import DataLoader

    from launcher.components import Component
    from launcher.recipe.schema import Recipe

# Values of a DeepSpeed config that the recipe decides; a user's JSON file may repeat them, not contradict them.
RECIPE_OWNED = (
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "train_batch_size",
    "gradient_clipping",
    "zero_optimization.stage",
    "bf16.enabled",
    "fp16.enabled",
)
# Sections the recipe builds itself (optimizer, schedule): DeepSpeed must not build a second one.
REFUSED_SECTIONS = ("optimizer", "scheduler")


class DeepSpeed(DDP):
    name = "deepspeed"
    checkpoint_format = "deepspeed"
    sharded = True
    updates_in_backward = True
    section = "deepspeed"
    launch_flag = "ACCELERATE_USE_DEEPSPEED"

    @contextlib.contextmanager
    def process_setup(self) -> Iterator[None]:
        """One process not started by a launcher still needs a process group for DeepSpeed; DeepSpeed calls
        collectives torch has renamed, a warning that would repeat at every step, on every rank."""
        saved = dict(os.environ)
        if "WORLD_SIZE" not in os.environ:
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
        try:
            with warnings.catch_warnings(), build_lock_watch(self.recipe.strategy.timeout_s):
                warnings.filterwarnings("ignore", r"`torch\.distributed\.\w+` is deprecated", FutureWarning)
                skip_inference_comm_op()
                yield
        finally:
            os.environ.clear()
            os.environ.update(saved)

    def accelerator(self, resumed_world: int | None) -> Accelerator:
        import torch
        from accelerate import Accelerator
        from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

        ds = self.recipe.strategy.deepspeed
        user = read_user_config(ds.config)[0] if ds.config else None
        config = deepspeed_config(self.recipe, self.processes, user)
        if resumed_world is not None and resumed_world != self.processes:
            config["checkpoint"] = {"load_universal": True}  # resuming on another number of processes
        # Without CUDA, DeepSpeed runs over gloo; Accelerate must then be told, or it sees a world of one.
        cuda = torch.cuda.is_available()
        group = InitProcessGroupKwargs(timeout=self.timeout(), **({} if cuda else {"backend": "gloo"}))
        return Accelerator(
            cpu=False,
            mixed_precision=self.recipe.train.mixed_precision,
            deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=config),
            kwargs_handlers=[group],
            **self.accelerator_options(),
        )

    def compile(self, accelerator: Accelerator, model: torch.nn.Module, found: list[torch.nn.Module]) -> None:
        """Nothing yet: DeepSpeed's engine compiles its module itself, once prepared (see `prepare`); ZeRO-3's
        hooks, which gather each module's parameters, would make blocks compiled before it recompile at every
        call."""

    def prepare(
        self, accelerator: Accelerator, model: torch.nn.Module, optimizer: Any, train: DataLoader
    ) -> tuple[torch.nn.Module, Any, DataLoader]:
        from launcher import compiling

        if line := self.alone_note(accelerator.num_processes):
            self.note(accelerator, line)
        model, optimizer, train = accelerator.prepare(model, optimizer, train)
        cfg = self.recipe.train.compile
        if cfg.enabled:
            kwargs = compiling.options(cfg)
            model.compile(backend=kwargs.pop("backend"), compile_kwargs=kwargs)
            whole = " (its engine compiles the whole model: train.compile.regional does not apply)" * cfg.regional
            self.note(accelerator, f"compiling with DeepSpeed's engine{whole}: the first update includes it")
        return model, optimizer, train

    def alone_note(self, processes: int) -> str | None:
        """What to tell a ZeRO-3 run on one process: there is nothing to shard, yet every module's parameters are
        still gathered and released around its use (offloading to the CPU is the one reason left to run it)."""
        if processes != 1 or self.recipe.strategy.deepspeed.zero_stage != 3 or self.offloaded():
            return None
        return (
            "ZeRO-3 on one process shards nothing but still gathers and releases every module's parameters at "
            "each use: DDP or FSDP2 trains faster here (strategy.name=ddp)"
        )

    def problems(self) -> list[str]:
        import importlib.util

        ds = self.recipe.strategy.deepspeed
        problems = []
        if ds.offload_params and ds.zero_stage != 3:
            problems.append(f"strategy.deepspeed.offload_params: needs zero_stage 3, got {ds.zero_stage}")
        if importlib.util.find_spec("deepspeed") is None:
            problems.append("strategy.name: deepspeed needs the deepspeed package: pip install 'launcher[deepspeed]'")
        if ds.config is not None:
            user, problem = read_user_config(ds.config)
            if problem:
                problems.append(f"strategy.deepspeed.config: {problem}")
            else:
                found = user_config_problems(self.recipe, user or {})
                problems.extend(f"strategy.deepspeed.config: {ds.config} {p}" for p in found)
        return problems

    def how(self) -> str:
        d = self.recipe.strategy.deepspeed
        offload = [name for name, on in (("optimizer", d.offload_optimizer), ("parameters", d.offload_params)) if on]
        return f"deepspeed ZeRO-{d.zero_stage}" + (f" (offload to CPU: {', '.join(offload)})" if offload else "")

    def memory(self, parameters: int, slots: int) -> dict[str, float]:
        half = self.recipe.train.mixed_precision in ("bf16", "fp16")
        return zero_partition(
            state_bytes(parameters, slots, half), self.recipe.strategy.deepspeed.zero_stage, self.processes
        )

    def offloaded(self) -> set[str]:
        d = self.recipe.strategy.deepspeed
        return {name for name, on in (("optimizer", d.offload_optimizer), ("parameters", d.offload_params)) if on}

    def describe(self, parameters: int | None, slots: int, model: torch.nn.Module | None = None) -> list[str]:
        ds = self.recipe.strategy.deepspeed
        user = read_user_config(ds.config)[0] if ds.config else None
        config = json.dumps(deepspeed_config(self.recipe, self.processes, user), indent=2)
        return [
            *super().describe(parameters, slots, model),
            f"deepspeed     config (generated from the recipe{f', {ds.config} merged in' if user else ''}):",
            *("              " + line for line in config.splitlines()),
        ]


def skip_inference_comm_op() -> None:
    """Keep DeepSpeed's communication backend from building (a C++ compile of a minute or more on a machine's first
    run) and starting its shared-memory all-reduce on the CPU: it serves `inference_all_reduce` (tensor-parallel
    inference) alone, while ZeRO training reduces through the process group (gloo). Marked unavailable, the
    backend goes without it."""
    try:
        import deepspeed.ops
        from deepspeed.accelerator import get_accelerator
    except ImportError:  # refused by `problems` before any run starts
        return
    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        deepspeed.ops.__compatible_ops__[builder.NAME] = False


def zero_partition(state: dict[str, float], stage: int, processes: int) -> dict[str, float]:
    """ZeRO's partitioning: optimizer state (stage 1), gradients too (2), parameters too (3)."""
    n = max(processes, 1)
    parts = ("optimizer", "gradients", "parameters")[: max(stage, 1)]
    return {k: v / n if k in parts else v for k, v in state.items()}


def deepspeed_config(recipe: Recipe, processes: int, user: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The DeepSpeed config a run uses: batch sizes, accumulation, clipping and precision from the recipe (so they
    cannot disagree), ZeRO options from `strategy.deepspeed`, the user's JSON merged in for everything else, over
    the documented ZeRO defaults (`zero_defaults`)."""
    t, ds = recipe.train, recipe.strategy.deepspeed
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu"}
    generated: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "train_batch_size": t.batch_size * t.gradient_accumulation_steps * processes,
        # DeepSpeed clips, once, with the global norm after the reduction; the loop only reads the norm back.
        "gradient_clipping": t.clip_grad_norm or 0.0,
        "zero_optimization": zero,
        "bf16": {"enabled": t.mixed_precision == "bf16"},
        "fp16": {"enabled": t.mixed_precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "zero_allow_untested_optimizer": True,  # the recipe's torch optimizer
        "steps_per_print": 2**31 - 1,  # progress is the launcher's to report
        "wall_clock_breakdown": False,
    }
    # The defaults under the user's JSON, the recipe's values over both.
    defaults = {
        "zero_optimization": {"stage": ds.zero_stage, **zero_defaults(ds.zero_stage, model_width(recipe.model))}
    }
    return deep_merge(deep_merge(defaults, user or {}), generated)


def zero_defaults(stage: int, width: int | None) -> dict[str, Any]:
    """The ZeRO settings DeepSpeed's and Hugging Face's documentation give (transformers' DeepSpeed guide,
    its ZeRO-2 and ZeRO-3 examples), sized to the model where its width (hidden size) is known, as `"auto"` is
    filled by Accelerate and transformers: DeepSpeed's own values (buckets of 5e8 and 5e7 elements, parameters of
    up to 1e5 kept whole) are for models of billions; on smaller ones they keep every matrix whole and move the
    gradients in one bucket after the backward, which overlaps nothing. A user's JSON overrides each."""
    if stage < 2:
        return {}
    # Reduce gradients while the backward goes on, into one preallocated buffer (no fragmentation).
    zero: dict[str, Any] = {"overlap_comm": True, "contiguous_gradients": True}
    if width:
        zero["reduce_bucket_size"] = width * width
    if stage == 3:
        zero.update(
            {
                "stage3_max_live_parameters": 1_000_000_000,
                "stage3_max_reuse_distance": 1_000_000_000,
                "sub_group_size": 1_000_000_000,
            }
        )
        if width:
            zero["stage3_prefetch_bucket_size"] = int(0.9 * width * width)
            zero["stage3_param_persistence_threshold"] = 10 * width
    return zero


WIDTH_KEYS = ("n_embd", "hidden_size", "d_model")  # the model's width as the GPT and Hugging Face configs name it


def model_width(model: Component) -> int | None:
    """The model's hidden size as the recipe gives it (the GPT's `n_embd`, a Hugging Face `config`'s
    `hidden_size`, or a local pretrained model's config.json), or None."""
    kwargs = dict(model.kwargs)
    found = [kwargs.get(k) for k in WIDTH_KEYS]
    if isinstance(kwargs.get("config"), Mapping):
        found += [kwargs["config"].get(k) for k in WIDTH_KEYS]
    pretrained = kwargs.get("pretrained")
    if isinstance(pretrained, str) and (Path(pretrained).expanduser() / "config.json").is_file():
        with contextlib.suppress(ValueError, OSError, AttributeError):
            saved = json.loads((Path(pretrained).expanduser() / "config.json").read_text())
            found += [saved.get(k) for k in WIDTH_KEYS]
    return next((w for w in found if isinstance(w, int) and not isinstance(w, bool) and w > 0), None)


def read_user_config(path: str) -> tuple[dict[str, Any] | None, str | None]:
    """A user's DeepSpeed JSON file, or the problem with it."""
    file = Path(path)
    if not file.is_file():
        return None, f"{path} is not a file"
    try:
        value = json.loads(file.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        return None, f"{path} is not valid JSON ({e})"
    if not isinstance(value, dict):
        return None, f"{path} must hold a JSON object"
    return value, None


def user_config_problems(recipe: Recipe, user: Mapping[str, Any]) -> list[str]:
    """Where a user's DeepSpeed JSON contradicts the recipe (`"auto"` always agrees)."""
    generated = deepspeed_config(recipe, processes=1)
    problems = []
    for dotted in RECIPE_OWNED:
        if dotted == "train_batch_size":
            continue  # depends on the world size; DeepSpeed checks it against the other two
        theirs, ours = _get(user, dotted), _get(generated, dotted)
        if theirs is not None and theirs != "auto" and theirs != ours:
            problems.append(
                f"sets {dotted}={json.dumps(theirs)} but the recipe gives {json.dumps(ours)}; the recipe decides "
                f"this (train.* or strategy.deepspeed.*): remove it from the file or make them agree"
            )
    for section in REFUSED_SECTIONS:
        if section in user:
            problems.append(f"has an '{section}' section; the recipe's {section} is used, so remove it from the file")
    return problems


def _get(config: Mapping[str, Any], dotted: str) -> Any:
    value: Any = config
    for part in dotted.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
