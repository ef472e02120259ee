"""`launcher train --processes N` starts the processes through torch's local elastic agent, with the launcher's
manners (see `processes.py`): after a failure the others get a few seconds to end by themselves, then SIGKILL;
what the processes reported is read back for the agent to say once; a refusal (exit code 2) or a stop request is
never restarted; restarts are announced in one line; stop requests sent to the agent reach every process, which
stop together and save. The rendezvous of several machines is held by the one of `--node-rank 0`."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torch.distributed.elastic.agent.server.api import RunResult, WorkerGroup, WorkerSpec, WorkerState
from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent
from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, LogsSpecs
from torch.distributed.elastic.rendezvous import RendezvousParameters
from torch.distributed.elastic.rendezvous.api import RendezvousError
from torch.distributed.elastic.rendezvous.registry import get_rendezvous_handler

from launcher.errors import say
from launcher.processes import (
    ATTEMPT_ENV,
    FORWARDED,
    GRACE_S,
    REPORTS_ENV,
    Failure,
    Launch,
    outcome,
    read_failures,
    summary,
)


class Agent(LocalElasticAgent):
    def __init__(
        self, spec: WorkerSpec, logs_specs: LogsSpecs, reports: Path, exit_barrier_timeout: float, quieted: str | None
    ):
        super().__init__(spec, logs_specs, start_method="spawn", exit_barrier_timeout=exit_barrier_timeout)
        self.reports = reports
        self.quieted = quieted
        self.attempt = -1  # the processes' start: 0 the first, then one more at each restart
        self.failures: list[Failure] = []  # of the last attempt that failed, the earliest first
        self.stop_signal: int | None = None

    @property
    def restarts_spent(self) -> bool:
        """Whether the run failed for good because no restart was left (not refused, not stopped on request)."""
        return self._remaining_restarts == 0 and not self.stop_signal and bool(self.failures)

    def _start_workers(self, worker_group: WorkerGroup) -> dict[int, Any]:
        if self.attempt >= 0:
            counted = worker_group.spec.max_restarts - self._remaining_restarts
            why = (
                f"{summary(self.failures)}; restarting the processes (restart {counted} of "
                f"{worker_group.spec.max_restarts})"
                if self.failures
                else "another machine restarted its processes; restarting these too"
            )
            say(f"warning: {why}: they continue from the newest complete checkpoint")
        self.attempt += 1
        self.failures = []
        # Every start after the first continues the run, whatever made the agent restart (a failure here, or
        # another machine's): torch counts the first kind only.
        os.environ[ATTEMPT_ENV] = str(self.attempt)
        value = os.environ.pop(self.quieted, None) if self.quieted else None
        try:
            return super()._start_workers(worker_group)  # the processes take this environment as they start
        finally:
            if value is not None:
                os.environ[self.quieted] = value

    def _stop_workers(self, worker_group: WorkerGroup) -> None:
        """Before a restart, or once restarts are spent: what still runs is killed, not asked to save (with a
        peer gone, it could not), after `_settle` gave it its chance to end by itself."""
        self._shutdown(signal.SIGKILL)

    def _monitor_workers(self, worker_group: WorkerGroup) -> RunResult:
        self._settle(worker_group)
        result = super()._monitor_workers(worker_group)
        refused = any(f.exitcode == 2 for f in result.failures.values())  # the same input is refused again
        if result.state in (WorkerState.FAILED, WorkerState.UNHEALTHY) and (refused or self.stop_signal):
            self._remaining_restarts = 0
        return result

    def _settle(self, worker_group: WorkerGroup) -> None:
        """Once a process failed: let the others end by themselves for a while (torch would SIGTERM them at once,
        which asks them to save with a dead peer), SIGKILL those still running, and read every process's exit
        code and report."""
        handlers = getattr(self._pcontext, "subprocess_handlers", {})
        ranks = {w.local_rank: w.global_rank for w in worker_group.workers}
        first = {ranks[i] for i, h in handlers.items() if h.proc.poll() not in (None, 0)}
        if not first:
            return
        deadline = time.monotonic() + GRACE_S
        while time.monotonic() < deadline and any(h.proc.poll() is None for h in handlers.values()):
            time.sleep(0.05)
        for handler in handlers.values():
            if handler.proc.poll() is None:
                handler.proc.kill()
                handler.proc.wait()
        codes = {ranks[i]: int(h.proc.returncode) for i, h in handlers.items()}
        self.failures = read_failures(self.reports / f"attempt{self.attempt}", codes, first)

    @contextlib.contextmanager
    def forwarding(self, signals: tuple[signal.Signals, ...]) -> Iterator[None]:
        """Stop requests sent to the agent (SIGTERM, Ctrl-C) passed on to every process (which are in sessions of
        their own, so a terminal's Ctrl-C reaches only the agent); no restart after one."""
        previous = {sig: signal.signal(sig, self._forward) for sig in signals}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _forward(self, signum: int, frame: Any) -> None:
        self.stop_signal = signum
        self._remaining_restarts = 0
        pids = list(self._pcontext.pids().values()) if self._pcontext is not None else []
        if not pids:  # still meeting the other machines: nothing to stop but the agent
            raise KeyboardInterrupt if signum == signal.SIGINT else SystemExit(128 + signum)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)


def local_address(master_addr: str, master_port: int) -> str:
    """The address of this machine as the master sees it: that of the interface that reaches the master. Other
    machines reach this one there, whatever its hostname resolves to elsewhere."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((master_addr, master_port))  # UDP: nothing is sent; the route picks the interface
            return s.getsockname()[0]
    except OSError:
        return socket.getfqdn()


def start(launch: Launch, train_args: list[str], quieted: str | None = None) -> int:
    """Run `python -m launcher train TRAIN_ARGS` as the group's processes on this machine; the exit code.
    `quieted`: a variable set for the agent alone, which the processes are started without."""
    # The agent's own log lines (its configuration, "Sending process ... closing signal") are not for users.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    reports = Path(tempfile.mkdtemp(prefix="launcher-reports-"))  # what each process ended with; gone at the end
    os.environ[REPORTS_ENV] = str(reports)
    try:
        return _run(launch, train_args, quieted, reports)
    finally:
        del os.environ[REPORTS_ENV]  # what goes wrong here after, the agent says itself
        shutil.rmtree(reports, ignore_errors=True)


def _run(launch: Launch, train_args: list[str], quieted: str | None, reports: Path) -> int:
    # Stop requests are passed on by the agent (`Agent.forward`), not turned into an abrupt shutdown by torch.
    os.environ["TORCHELASTIC_SIGNALS_TO_HANDLE"] = "SIGHUP,SIGQUIT"
    # The processes of each attempt meet on a store of their own: on the rendezvous's shared one, a restarted group
    # finds the addresses its predecessors left there and tries to connect to them.
    os.environ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    if "OMP_NUM_THREADS" not in os.environ:  # the machine's cores shared out, not each process taking them all
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // launch.processes))
    parameters = rendezvous(launch)
    try:
        handler = get_rendezvous_handler(parameters)  # the machine of --node-rank 0 opens it; the others connect
        spec = WorkerSpec(
            role="train",
            local_world_size=launch.processes,
            entrypoint=sys.executable,
            args=("-m", "launcher", "train", *train_args),
            rdzv_handler=handler,
            max_restarts=launch.max_restarts,
            monitor_interval=0.1,
            local_addr=parameters.local_addr,
        )
        logs = DefaultLogsSpecs(log_dir=str(reports / "logs"))
        agent = Agent(spec, logs, reports, exit_barrier_timeout=launch.timeout_s, quieted=quieted)
        with agent.forwarding(FORWARDED):
            try:
                result = agent.run()
            finally:
                handler.shutdown()
    except RendezvousError as e:
        say(
            f"error: the rendezvous at {parameters.endpoint} did not complete within strategy.timeout_s="
            f"{launch.timeout_s:g} ({type(e).__name__}): {launch.nodes} machines were expected, each running this "
            "command with the same --nodes, --master-addr and --master-port, the first with --node-rank 0"
        )
        return 1
    if not result.is_failed():
        return 0
    lines, code = outcome(agent.failures)
    for line in lines:
        say(line)
    if launch.max_restarts and agent.restarts_spent and code != 2:
        what = "" if lines else f"{summary(agent.failures)}; "
        say(f"error: {what}no restart left (--max-restarts {launch.max_restarts})")
    return code


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rendezvous(launch: Launch) -> RendezvousParameters:
    """Where and how the machines meet: on one machine, at a free port of 127.0.0.1; on several, at the master's
    address and port, each machine known to the others by the address of its interface toward the master."""
    single = launch.nodes == 1
    addr = "127.0.0.1" if single else launch.master_addr
    port = _free_port() if single else launch.master_port
    return RendezvousParameters(
        backend="c10d",
        endpoint=f"{addr}:{port}",
        run_id=os.environ.get("SLURM_JOB_ID", "launcher"),
        min_nodes=launch.nodes,
        max_nodes=launch.nodes,
        local_addr="127.0.0.1" if single else local_address(addr, port),
        # The machine of --node-rank 0 holds the rendezvous, however its hostname resolves (torch would guess it
        # from the hostname, and where it guesses wrong on every machine, none holds it and all wait).
        is_host=launch.node_rank == 0,
        join_timeout=launch.timeout_s,
        read_timeout=launch.timeout_s,
    )
