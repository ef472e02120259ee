"""W&B and MLflow runs that outlive an attempt: which run a resumed, restarted or requeued attempt continues, and
which steps it still sends there.

The runs' ids are kept in the run dir (`trackers.json`). An attempt that continues the run opens the same tracker
runs and asks each what it already holds: MLflow's tracking store its metrics' steps, W&B its local transaction
logs (`run-<id>.wandb`, which is also what `wandb sync` uploads; a hard-killed process leaves in them only what
W&B had written to disk, often nothing of its last minutes). A step the tracker holds is not sent again; the steps
between what it holds and the checkpoint the attempt resumed from are sent from `metrics.jsonl`, the attempt
sends the rest as it trains. Resume is exact, so a step has the same values whichever attempt sent it.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from launcher.layout import TRACKERS_FILE, read_json

# W&B's transaction log: LevelDB's log format (32 KiB blocks of chunks, each a 7-byte header: CRC, length, type)
# after a 7-byte file header of its own.
WANDB_MAGIC = b":W&B"
WANDB_BLOCK = 32768
CHUNK_HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def stored_ids(run_dir: Path) -> dict[str, str]:
    """Tracker name -> the id of its run, as the run's first attempt (or a later one that had to start anew)
    stored them."""
    found = read_json(run_dir / TRACKERS_FILE)
    return {name: v["run_id"] for name, v in found.items() if isinstance(v, dict) and isinstance(v.get("run_id"), str)}


def store_ids(run_dir: Path, ids: dict[str, str]) -> None:
    """Write `ids` as the run's tracker runs, replacing the file whole (a crash leaves the old one or the new)."""
    path = run_dir / TRACKERS_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({name: {"run_id": run_id} for name, run_id in sorted(ids.items())}, indent=2) + "\n")
    tmp.replace(path)


def sends(step: int | None, held_through: int | None) -> bool:
    """Whether a value logged at `step` goes to a tracker whose run already holds the steps up to `held_through`
    (None: a run this attempt started, which holds nothing of the others')."""
    return step is None or held_through is None or step > held_through


def backfill(rows: list[dict[str, Any]], held_through: int, resumed_at: int) -> list[tuple[int, dict[str, float]]]:
    """The rows of `metrics.jsonl` a continued tracker run lacks: those after the steps it holds, up to where this
    attempt starts (what comes later, the attempt logs itself). A non-finite value, null in the file, is left
    out, as is a row without a step."""
    out = []
    for row in rows:
        step = row.get("step")
        if not isinstance(step, int) or not held_through < step <= resumed_at:
            continue
        values = {k: v for k, v in row.items() if k not in ("step", "time") and isinstance(v, (int, float))}
        if values:
            out.append((step, values))
    return out


def mlflow_run_exists(run_id: str) -> bool:
    """Whether the tracking store still has the run, not deleted."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        run = MlflowClient().get_run(run_id)
    except MlflowException:
        return False
    return run.info.lifecycle_stage != "deleted"


def mlflow_last_step(run_id: str) -> int:
    """The greatest step of any metric the MLflow run holds; -1 where it holds none."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    keys = client.get_run(run_id).data.metrics
    return max((m.step for key in keys for m in client.get_metric_history(run_id, key)), default=-1)


def mlflow_params(run_id: str) -> dict[str, str]:
    from mlflow.tracking import MlflowClient

    return dict(MlflowClient().get_run(run_id).data.params)


def wandb_last_step(wandb_dir: Path, run_id: str) -> int:
    """The greatest step in the W&B run's transaction logs under `wandb_dir` (one folder per attempt); -1 where
    they hold none."""
    from wandb.proto.wandb_internal_pb2 import Record

    last = -1
    for path in sorted(wandb_dir.glob(f"*-{run_id}/run-{run_id}.wandb")):
        for data in wandb_records(path.read_bytes()):
            record = Record()
            try:
                record.ParseFromString(data)
            except Exception:  # a record cut short by a crash: the log ends there
                break
            if record.WhichOneof("record_type") == "history":
                last = max(last, record.history.step.num)
    return last


def wandb_records(data: bytes) -> Iterator[bytes]:
    """The records of a W&B transaction log, up to the first chunk that is cut short or not a chunk at all."""
    if not data.startswith(WANDB_MAGIC):
        return
    pos, pending = CHUNK_HEADER, b""
    while pos + CHUNK_HEADER <= len(data):
        left = WANDB_BLOCK - pos % WANDB_BLOCK
        if left < CHUNK_HEADER:  # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + CHUNK_HEADER])
        chunk = data[pos + CHUNK_HEADER : pos + CHUNK_HEADER + length]
        if len(chunk) < length or kind not in (FULL, FIRST, MIDDLE, LAST):
            return
        pos += CHUNK_HEADER + length
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        else:
            yield pending + chunk
            pending = b""
