"""`launcher train --processes N`: the run's processes started by torch's elastic agent (the API behind torchrun
and `accelerate launch`), so that a refusal or failure on any rank ends with that rank's own line and exit code
instead of the agent's traceback, and a failed group can be restarted (`--max-restarts`).

Each process writes how it ended, when it ends with an error, to a file of its own (`report_failure`, called by the
CLI); the agent reads them once its processes have ended and says the first failure once (`outcome`). After one
process fails, the others get a few seconds to end by themselves (they say why: a lost peer, the same refusal),
then SIGKILL: a group with a dead member cannot save anyway, and its checkpoints are complete or ignored.

No torch at import: the CLI imports this module in every process.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPORTS_ENV = "LAUNCHER_FAILURE_REPORTS"  # set by the agent: the folder each process reports its failure into
RESTART_ENV = "TORCHELASTIC_RESTART_COUNT"  # set by torch's elastic agent (ours, torchrun's, accelerate's)
ATTEMPT_ENV = "LAUNCHER_ATTEMPT"  # set by ours: its starts of the processes before this one, whatever the reason
GRACE_S = 5.0  # how long the others may take to end by themselves after one process failed
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)  # a stop request, passed on to every process


@dataclass(frozen=True)
class Launch:
    processes: int  # on this machine
    nodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    max_restarts: int = 0
    timeout_s: float = 1800.0  # the rendezvous's: how long this machine waits for the others to join


@dataclass(frozen=True)
class Failure:
    """How one process ended: its exit code (negative: the signal that killed it) and what it reported."""

    rank: int
    exit_code: int
    lines: tuple[str, ...] = ()  # what it had to say (a refusal, a lost peer), not said yet
    said: str = ""  # the last line of the error it printed itself (a traceback)
    time: float = 0.0


def launch_problems(launch: Launch, env: Mapping[str, str]) -> list[str]:
    """What is wrong with the flags of `launcher train --processes`, before anything starts."""
    problems = []
    if "LOCAL_RANK" in env or int(env.get("WORLD_SIZE", "1") or 1) > 1:
        problems.append(
            "--processes: this process was itself started as one of several (LOCAL_RANK or WORLD_SIZE is set); "
            "use --processes without accelerate launch, torchrun or srun's tasks"
        )
    for flag, value, least in (("--processes", launch.processes, 1), ("--nodes", launch.nodes, 1)):
        if value < least:
            problems.append(f"{flag}: must be >= {least}, got {value}")
    if launch.max_restarts < 0:
        problems.append(f"--max-restarts: must be >= 0, got {launch.max_restarts}")
    if not 0 <= launch.node_rank < max(launch.nodes, 1):
        problems.append(f"--node-rank: must be between 0 and --nodes - 1 ({launch.nodes - 1}), got {launch.node_rank}")
    if not 0 < launch.master_port < 65536:
        problems.append(f"--master-port: must be a port between 1 and 65535, got {launch.master_port}")
    return problems


# ------------------------------------------------------------------------------------------------ in each process


def under_agent(env: Mapping[str, str] = os.environ) -> bool:
    return bool(env.get(REPORTS_ENV))


def restart_count(env: Mapping[str, str]) -> int:
    """How often the elastic agent restarted this process's group (0: the first attempt). torch counts restarts
    after a failure on this machine; the launcher's agent also those after another machine's."""
    return max(int(env.get(RESTART_ENV, "0") or 0), int(env.get(ATTEMPT_ENV, "0") or 0))


def report_failure(lines: list[str], exit_code: int, said: str = "", env: Mapping[str, str] = os.environ) -> None:
    """Under the agent: what this process ends with, for the agent to say once for all (it says nothing itself);
    `said`: the error it printed itself, as a traceback."""
    path = Path(env[REPORTS_ENV]) / f"attempt{restart_count(env)}" / f"rank{env.get('RANK', '0')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"lines": lines, "exit_code": exit_code, "said": said, "time": time.time()}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record))
    tmp.replace(path)


# ------------------------------------------------------------------------------------------------------- the agent


def read_failures(folder: Path, exit_codes: Mapping[int, int], first: set[int]) -> list[Failure]:
    """Every process that did not end well (rank: exit code), with what it reported, the earliest first: those
    in `first` (which had failed when the agent noticed), then those that failed after them (a lost peer)."""
    failures = []
    for rank, code in exit_codes.items():
        if code == 0:
            continue
        try:
            record: dict[str, Any] = json.loads((folder / f"rank{rank}.json").read_text())
        except (OSError, ValueError):
            record = {}
        failures.append(
            Failure(
                rank,
                int(record.get("exit_code", code)) if code > 0 else code,
                tuple(record.get("lines", ())),
                str(record.get("said", "")),
                # A process killed by a signal says nothing, and its peers then report it lost: it came first.
                float(record.get("time", float("-inf") if code < 0 else float("inf"))),
            )
        )
    return sorted(failures, key=lambda f: (f.rank not in first, f.time, f.rank))


def outcome(failures: list[Failure]) -> tuple[list[str], int]:
    """What the agent says and exits with: the first failure that has something to say, said once; where none
    does, the first one's exit code (a traceback was printed by its process) or the signal that killed it."""
    if not failures:
        return [], 0
    # The earliest, unless it has nothing to say (a rank whose main process speaks for it).
    first = next((f for f in failures if f.lines or f.said or f.exit_code < 0), failures[0])
    if first.lines:
        return list(first.lines), first.exit_code
    if first.exit_code < 0:
        return [f"error: rank {first.rank} was killed by {_signal_name(-first.exit_code)}"], 1
    return [], first.exit_code


def summary(failures: list[Failure]) -> str:
    """The first failure in a few words, for the lines that announce a restart and the end of the restarts."""
    lines, code = outcome(failures)
    if lines:
        return lines[0].removeprefix("error: ")
    first = next((f for f in failures if f.said), None)
    if first is not None:
        return f"rank {first.rank} failed: {first.said}"
    return f"a process failed (exit code {code})"


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
