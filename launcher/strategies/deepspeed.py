"""DeepSpeed ZeRO (stages 1-3, optional CPU offload): the engine owns backward, clipping and the update, which
it applies inside backward; checkpoints are its own ZeRO partitions, every process writing its own.

The config is generated from the recipe (batch sizes, accumulation, clipping, precision cannot disagree) with a
user's JSON merged in for everything else.
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

from launcher.recipe.dialect import deep_merge
from launcher.strategies.base import DDP
from launcher.strategies.memory import state_bytes

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator
    from torch.utils.data import DataLoader

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
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", r"`torch\.distributed\.\w+` is deprecated", FutureWarning)
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

        model, optimizer, train = accelerator.prepare(model, optimizer, train)
        cfg = self.recipe.train.compile
        if cfg.enabled:
            kwargs = compiling.options(cfg)
            model.compile(backend=kwargs.pop("backend"), compile_kwargs=kwargs)
            whole = " (its engine compiles the whole model: train.compile.regional does not apply)" * cfg.regional
            self.note(accelerator, f"compiling with DeepSpeed's engine{whole}: the first update includes it")
        return model, optimizer, train

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

    def describe(self, parameters: int | None, slots: int) -> list[str]:
        ds = self.recipe.strategy.deepspeed
        user = read_user_config(ds.config)[0] if ds.config else None
        config = json.dumps(deepspeed_config(self.recipe, self.processes, user), indent=2)
        return [
            *super().describe(parameters, slots),
            f"deepspeed     config (generated from the recipe{f', {ds.config} merged in' if user else ''}):",
            *("              " + line for line in config.splitlines()),
        ]


def zero_partition(state: dict[str, float], stage: int, processes: int) -> dict[str, float]:
    """ZeRO's partitioning: optimizer state (stage 1), gradients too (2), parameters too (3)."""
    n = max(processes, 1)
    parts = ("optimizer", "gradients", "parameters")[: max(stage, 1)]
    return {k: v / n if k in parts else v for k, v in state.items()}


def deepspeed_config(recipe: Recipe, processes: int, user: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The DeepSpeed config a run uses: batch sizes, accumulation, clipping and precision from the recipe (so they
    cannot disagree), ZeRO options from `strategy.deepspeed`, and the user's JSON merged in for everything else."""
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
    return deep_merge(dict(user or {}), generated)


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
