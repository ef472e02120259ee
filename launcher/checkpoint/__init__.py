"""Checkpoints: atomic directories, loaded without unpickling objects.

A checkpoint is a directory `step_00000400/` holding the model and optimizer state, `scheduler.pt`, `scaler.pt`
(fp16), `rng.pt` (every rank's RNG), `data_state.pt` (every rank's place in a streamed train set), `recipe.yaml`
and, written last, `trainer_state.json`. How it holds the model and optimizer is its format (`formats.py`):
`model.safetensors` + `optimizer.safetensors`, written by the main process alone (DDP, one process), or each
process's shard in `dcp/` (FSDP) or `deepspeed/` (DeepSpeed ZeRO), see `shards.py`. The directory is built under a
hidden temporary name, synced to disk and renamed into place, so a crash at any moment leaves either the whole
directory or none of it (`writer.py`). `trainer_state.json` records every other file's size and checksum
(`integrity.py`): a checkpoint damaged after it was written is refused in one line naming the file (`restore.py`),
and passed over by `resume=auto` (`retention.py`).

- `retention.py`: which checkpoints a run has (latest, best, intact, interrupted) and which it keeps (and how it
  deletes the others: renamed to `.pruned-step_...` first, so a kill mid-way leaves no damaged-looking checkpoint).
- `formats.py`: the three on-disk formats, one object each; `weights.py`: the `full` format's files.
- `writer.py`: `Writer`, which saves; `restore.py`: `load`, which resumes.
- `info.py`: `launcher ckpt info` and `launcher ckpt export`.
- `remote.py`: the same two commands on checkpoints in object storage (`launcher/storage.py` uploads them there).
- `integrity.py` (checksums), `statefile.py` (nested state in safetensors), `shards.py` (DCP and DeepSpeed).
"""

from launcher.checkpoint.formats import FORMATS, Format, checkpoint_format, format_of
from launcher.checkpoint.hf_export import NotHuggingFace
from launcher.checkpoint.info import describe, export, summary
from launcher.checkpoint.named import resume_problem
from launcher.checkpoint.restore import data_states, load
from launcher.checkpoint.retention import (
    best,
    finish_pruning,
    incomplete,
    interrupted,
    latest,
    latest_intact,
    prune,
    rank_best,
    resolve,
    retained,
    to_delete,
)
from launcher.checkpoint.weights import (
    OLD_OPTIMIZER_FILE,
    OPTIMIZER_FILE,
    WEIGHTS_FILE,
    load_optimizer_state,
    load_weights,
    read_weights,
    weights_snapshot,
)
from launcher.checkpoint.writer import Writer, replace_dir
from launcher.layout import STATE_FILE, complete_steps, is_complete, step_dir_name

__all__ = [
    "FORMATS",
    "OLD_OPTIMIZER_FILE",
    "OPTIMIZER_FILE",
    "STATE_FILE",
    "WEIGHTS_FILE",
    "Format",
    "NotHuggingFace",
    "Writer",
    "best",
    "checkpoint_format",
    "complete_steps",
    "data_states",
    "describe",
    "export",
    "finish_pruning",
    "format_of",
    "incomplete",
    "interrupted",
    "is_complete",
    "latest",
    "latest_intact",
    "load",
    "load_optimizer_state",
    "load_weights",
    "prune",
    "rank_best",
    "read_weights",
    "replace_dir",
    "resolve",
    "resume_problem",
    "retained",
    "step_dir_name",
    "summary",
    "to_delete",
    "weights_snapshot",
]
