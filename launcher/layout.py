"""Where a run keeps its files: the run dir's file names and the checkpoints' step dirs.

No torch here: `launcher report` reads a run dir without loading it (or the seconds it takes to import).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

RECIPE_FILE = "recipe.yaml"  # the resolved recipe (also in every checkpoint)
ENV_FILE = "env.json"
LAST_RUN_FILE = "last_run.json"
METRICS_FILE = "metrics.jsonl"
ROLLED_BACK_FILE = "metrics.rolled_back.jsonl"  # rows a failed attempt logged after its last checkpoint
TRACKERS_FILE = "trackers.json"  # the W&B and MLflow run ids, which later attempts continue
HISTORY_FILE = "history.jsonl"  # one line per attempt's start and end: what `launcher report` counts resumes by
SLURM_ATTEMPTS_FILE = "attempts.jsonl"  # in <run_dir>/slurm/: one line per start of the job, and per requeue
LOCK_FILE = ".lock"  # held by a live run's main process: one run per run dir (see runlock.py)
LOCK_HOLDER_FILE = ".lock_holder.json"  # who holds it: host, pid, SLURM job
CHECKPOINTS_DIR = "checkpoints"  # in the run dir, unless the recipe's checkpoint.dir names another folder
PROFILE_DIR = "profile"  # torch.profiler traces and CUDA memory snapshots (the recipe's `profile` section)
TRACE_SUFFIX = ".pt.trace.json"  # Chrome-trace JSON; the suffix TensorBoard's profiler plugin looks for
MEMORY_SNAPSHOT_SUFFIX = ".memory.pickle"  # torch.cuda.memory._dump_snapshot, for pytorch.org/memory_viz

# In a checkpoint (a step dir).
STATE_FILE = "trainer_state.json"  # written last: its presence makes the checkpoint complete
WEIGHTS_FILE = "model.safetensors"  # `full` format (DDP, one process)
OPTIMIZER_FILE = "optimizer.safetensors"  # `full` format
OLD_OPTIMIZER_FILE = "optimizer.pt"  # written by launcher 0.1.0 before optimizer.safetensors
SCHEDULER_FILE = "scheduler.pt"
SCALER_FILE = "scaler.pt"  # fp16 only
RNG_FILE = "rng.pt"  # every rank's RNG state
DATA_FILE = "data_state.pt"  # every rank's place in a streamed train set (only where the train set is a stream)
DCP_DIR = "dcp"  # `dcp` format (FSDP): every process's shard
HF_DIR = "hf"  # a Hugging Face model's config, generation config and tokenizer: what `ckpt export --format hf` adds
LORA_BASE_FILE = "lora_base.json"  # in HF_DIR of a LoRA model's checkpoint: the base its adapters trained on
ADAPTER_CONFIG_FILE = "adapter_config.json"  # in HF_DIR of a LoRA model's checkpoint: peft's adapter config
DEEPSPEED_DIR = "deepspeed"  # `deepspeed` format: the tag of DeepSpeed's checkpoint, its ZeRO partitions

# Step dirs, and the hidden siblings a save or resume makes of one (`.tmp-step_00000400`).
STEP_PREFIX = "step_"
STEP_DIR = re.compile(rf"^{STEP_PREFIX}(\d+)$")
TMP_PREFIX = ".tmp-"  # a save under way (or interrupted): renamed into place once complete
OLD_PREFIX = ".old-"  # the directory a save replaces, moved aside until the new one is in place
PRUNED_PREFIX = ".pruned-"  # a checkpoint retention removes: renamed first, so that it is gone at once, then deleted
UNIVERSAL_PREFIX = ".universal-"  # a DeepSpeed checkpoint converted for another world size, while it is loaded
CHECKPOINT_PREFIXES = (STEP_PREFIX, TMP_PREFIX + STEP_PREFIX, OLD_PREFIX + STEP_PREFIX)  # saves a crash interrupted
LATEST, BEST = "latest", "best"  # `<checkpoints>/latest` and `/best` name checkpoints (looked up, no links)


def profile_name(rank: int, first: int, last: int, suffix: str) -> str:
    """A profile file of one rank's recorded updates: `rank0.steps_5-7.pt.trace.json`."""
    return f"rank{rank}.steps_{first}-{last}{suffix}"


def step_dir_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:08d}"


def tmp_dir(path: Path) -> Path:
    """Where `path` is built before it is renamed into place."""
    return path.parent / f"{TMP_PREFIX}{path.name}"


def old_dir(path: Path) -> Path:
    """Where `path` is moved aside while a new one replaces it."""
    return path.parent / f"{OLD_PREFIX}{path.name}"


def pruned_dir(path: Path) -> Path:
    """Where retention moves `path` before deleting it."""
    return path.parent / f"{PRUNED_PREFIX}{path.name}"


def universal_dir(path: Path) -> Path:
    """Where a DeepSpeed checkpoint at `path` is converted to DeepSpeed's universal format."""
    return path.parent / f"{UNIVERSAL_PREFIX}{path.name}"


def is_interrupted_name(name: str) -> bool:
    """A directory name that a save still under way, or interrupted, leaves."""
    return name.startswith((TMP_PREFIX, OLD_PREFIX))


def is_complete(path: Path) -> bool:
    return (path / STATE_FILE).is_file()


def complete_steps(ckpt_dir: Path) -> list[int]:
    """Steps of the complete checkpoints under `ckpt_dir`, oldest first; partial or foreign dirs are ignored."""
    if not ckpt_dir.is_dir():
        return []
    steps = []
    for child in ckpt_dir.iterdir():
        match = STEP_DIR.match(child.name)
        if match and is_complete(child):
            steps.append(int(match.group(1)))
    return sorted(steps)


def is_url(text: str) -> bool:
    """A storage URL (`s3://bucket/prefix`, `gs://...`), as opposed to a path on this machine's file system."""
    match = re.match(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://", text)
    return match is not None and match.group(1).lower() not in ("file", "local")


def read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The lines of a JSON-lines file that parse (a line cut short by a crash is skipped)."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def restarts(history: list[dict[str, Any]]) -> int:
    """The attempts in a run's history (`HISTORY_FILE`) that the elastic agent started after a failure: their start
    lines carry its `restart` count."""
    return sum(bool(e.get("restart")) for e in history if e.get("event") == "start")


def recorded_split(record: dict[str, Any], world: Any = None) -> tuple[Any, Any]:
    """(processes, data ranks) as `env.json` or a trainer state records them (`world`: where it records no world
    size); one written before tensor parallelism records no data ranks: every process read batches of its own."""
    processes = record.get("world_size", world)
    return processes, record.get("data_ranks", processes)


def mesh_text(processes: int, data_ranks: int) -> str:
    """` (2 data ranks x 2 tensor-parallel)` where a tensor-parallel group reads one batch; nothing otherwise."""
    return f" ({data_ranks} data ranks x {processes // data_ranks} tensor-parallel)" if data_ranks != processes else ""
