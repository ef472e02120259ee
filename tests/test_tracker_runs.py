"""W&B and MLflow runs across attempts: a killed run that resumes goes on in the same tracker runs, every step
once, with the values of `metrics.jsonl`."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from launcher import tracker_runs
from launcher.layout import read_jsonl
from launcher.tracker_runs import backfill, sends
from tests.conftest import read_metrics

TIMEOUT = 180


# ------------------------------------------------------------------------------------------- pure decisions


def test_a_continued_tracker_run_gets_only_the_steps_after_those_it_holds():
    assert [s for s in range(18, 26) if sends(s, 22)] == [23, 24, 25]
    assert all(sends(s, None) for s in (0, 1, 5))  # a run of the attempt's own gets everything
    assert sends(None, 22)  # a value without a step is the tracker's to place


def test_the_rows_a_tracker_lacks_up_to_the_resumed_step_are_sent_from_the_metrics_file():
    rows = [
        {"step": 10, "time": 1.0, "train/loss": 1.0},
        {"step": 20, "time": 2.0, "train/loss": 0.5, "grad_norm": None},  # null: a non-finite value
        {"step": 20, "time": 2.1, "val/loss": 0.7},
        {"step": 30, "time": 3.0, "train/loss": 0.25},
        {"time": 3.5, "train/loss": 9.0},
    ]
    assert backfill(rows, held_through=10, resumed_at=20) == [(20, {"train/loss": 0.5}), (20, {"val/loss": 0.7})]
    assert backfill(rows, held_through=-1, resumed_at=30)[0] == (10, {"train/loss": 1.0})
    assert backfill(rows, held_through=30, resumed_at=20) == []  # it holds more than the checkpoint: nothing


def chunk(kind: int, data: bytes) -> bytes:
    return struct.pack("<IHB", 0, len(data), kind) + data


def test_w_and_b_records_are_read_across_blocks_and_up_to_a_cut():
    head = tracker_runs.WANDB_MAGIC + b"\xe1\xbe\x00"
    big = bytes(range(256)) * 200  # 51200 bytes: split across two 32 KiB blocks
    first = tracker_runs.WANDB_BLOCK - len(head) - 7 - len(chunk(1, b"a"))
    body = chunk(1, b"a") + chunk(2, big[:first]) + chunk(4, big[first:])
    assert list(tracker_runs.wandb_records(head + body)) == [b"a", big]
    assert list(tracker_runs.wandb_records(head + body[:-5])) == [b"a"]  # the last record cut short by a kill
    assert list(tracker_runs.wandb_records(b"something else")) == []


def test_stored_ids_are_read_back_and_a_broken_file_holds_none(tmp_path: Path):
    tracker_runs.store_ids(tmp_path, {"wandb": "a1", "mlflow": "b2"})
    assert tracker_runs.stored_ids(tmp_path) == {"wandb": "a1", "mlflow": "b2"}
    (tmp_path / "trackers.json").write_text('{"wandb": {"run_id": ')
    assert tracker_runs.stored_ids(tmp_path) == {}


# ---------------------------------------------------------------------------------------------- real processes


def wandb_steps(wandb_dir: Path) -> tuple[set[str], dict[int, list[dict[str, float]]]]:
    """The W&B run ids of the local run folders, and each step's history records (values by key) across them."""
    from wandb.proto.wandb_internal_pb2 import Record

    ids, steps = set(), {}
    for path in sorted(wandb_dir.glob("*-run-*/run-*.wandb")):
        ids.add(path.stem.removeprefix("run-"))
        for data in tracker_runs.wandb_records(path.read_bytes()):
            record = Record()
            record.ParseFromString(data)
            if record.WhichOneof("record_type") == "history":
                values = {".".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.history.item}
                steps.setdefault(record.history.step.num, []).append(
                    {k: v for k, v in values.items() if not k.startswith("_")}
                )
    return ids, steps


@pytest.mark.slow
def test_a_killed_run_resumes_in_the_same_mlflow_and_w_and_b_runs_every_step_once(
    faulty: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # for the client reading the store back here

    recipe = faulty  # SIGKILL (as when a node is lost) at a given training forward
    run_dir, uri = tmp_path / "run", f"file:{tmp_path / 'mlruns'}"
    env = {
        **os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
        "MLFLOW_TRACKING_URI": uri, "MLFLOW_ALLOW_FILE_STORE": "true",
        "WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(tmp_path),
        "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"), "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"),
        "WANDB_DATA_DIR": str(tmp_path / "wandb-data"),
    }  # fmt: skip
    args = [sys.executable, "-m", "launcher", "train", str(recipe), f"run_dir={run_dir}",
            "logging.trackers=[jsonl,mlflow,wandb]", "resume=auto"]  # fmt: skip

    def attempt(**extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(args, cwd=tmp_path, env={**env, **extra}, capture_output=True, text=True,
                              timeout=TIMEOUT, check=False)  # fmt: skip

    killed = attempt(FAULT="kill", FAULT_AT="27", FAULT_RANK="0")  # after the checkpoint at 20, steps 21-26 logged
    assert killed.returncode == -9, killed.stderr
    first_ids = json.loads((run_dir / "trackers.json").read_text())
    resumed = attempt()
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout, resumed.stdout
    ids = tracker_runs.stored_ids(run_dir)
    assert json.loads((run_dir / "trackers.json").read_text()) == first_ids and set(ids) == {"mlflow", "wandb"}

    logged, rolled_back = by_step(read_metrics(run_dir)), by_step(read_jsonl(run_dir / "metrics.rolled_back.jsonl"))
    assert sorted(logged) == list(range(1, 41)) and sorted(rolled_back) == list(range(21, 27))

    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("faulty").experiment_id])
    assert run.info.run_id == ids["mlflow"] and run.info.status == "FINISHED"
    assert run.info.run_name == "run" and run.data.params["optimizer.lr"] == "0.003"  # the run dir's name, the recipe
    in_mlflow: dict[int, list[dict[str, float]]] = {}
    for key in run.data.metrics:
        for m in client.get_metric_history(run.info.run_id, key):
            in_mlflow.setdefault(m.step, []).append({key: m.value})
    assert all(len(v) == len({k for d in v for k in d}) for v in in_mlflow.values()), "a key twice at a step"
    same_as_logged(in_mlflow, logged, rolled_back)

    wandb_ids, in_wandb = wandb_steps(run_dir / "wandb")
    assert wandb_ids == {ids["wandb"]}
    assert len(list((run_dir / "wandb").glob(f"offline-run-*-{ids['wandb']}"))) == 2  # one folder per attempt
    assert all(len(records) == 1 for records in in_wandb.values()), "a step twice"
    same_as_logged(in_wandb, logged, rolled_back)


def by_step(rows: list[dict]) -> dict[int, dict[str, float]]:
    out: dict[int, dict[str, float]] = {}
    for row in rows:
        out.setdefault(row["step"], {}).update({k: v for k, v in row.items() if k not in ("step", "time")})
    return out


def same_as_logged(
    tracker: dict[int, list[dict[str, float]]], logged: dict[int, dict], rolled_back: dict[int, dict]
) -> None:
    """Every step of `metrics.jsonl` is in the tracker with its values; where the tracker got a step from the
    killed attempt, before the checkpoint the resumed one started from, its measures of speed and memory are that
    attempt's (in `metrics.rolled_back.jsonl`), the rest the same as the resumed attempt's, which resumed exactly."""
    assert sorted(tracker) == sorted(logged)
    for step, records in tracker.items():
        values = {k: v for record in records for k, v in record.items()}
        assert values == logged[step] or values == rolled_back.get(step), step
        exact = {k: v for k, v in logged[step].items() if not k.startswith(("throughput/", "flops_per_s", "memory/"))}
        assert {k: values[k] for k in exact} == exact, step


def test_an_mlflow_run_continued_gets_only_new_steps_and_a_lost_one_is_replaced_with_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    from mlflow.tracking import MlflowClient

    from launcher.trackers import MLflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file:{tmp_path / 'mlruns'}")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")

    def attempt(run_id: str | None, steps: range) -> MLflow:
        tracker = MLflow("exp", "run", run_id)
        tracker.start()
        tracker.store_init_configuration({"lr": 0.1, "attempt": 1 if run_id is None else 2})
        for step in steps:
            tracker.log({"loss": float(step)}, step)
        tracker.finish()
        return tracker

    first = attempt(None, range(1, 6))
    run_id = first.run_ids["mlflow"]
    again = attempt(run_id, range(3, 8))  # resumed from a checkpoint at 2
    assert again.held_through == 5 and again.run_ids == {"mlflow": run_id}
    client = MlflowClient()
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [1, 2, 3, 4, 5, 6, 7]
    assert client.get_run(run_id).data.params == {"lr": "0.1", "attempt": "1"}  # MLflow's params stay as stored

    gone = attempt("0" * 32, range(3, 5))
    assert gone.held_through is None and gone.run_ids["mlflow"] not in (run_id, "0" * 32)
    assert f"warning: MLflow has no run {'0' * 32} (in trackers.json); logging to a new run" in capsys.readouterr().err
