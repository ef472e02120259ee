"""A real SLURM cluster of two nodes on this machine, for the tests: munged, slurmctld and two slurmd.

`LocalCluster(folder).start()` installs Debian's slurmctld, slurmd, slurm-client and munge when they are missing
(as root), writes a slurm.conf for node1 and node2 (both this host, at 127.0.0.1), starts the daemons and waits
until `sinfo` shows both nodes idle; `stop()` stops what it started. Commands that talk to the cluster need
`env()` (SLURM_CONF). Any step that fails raises ClusterError with the reason and the daemons' logs.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
CTLD_PORT, NODE_PORTS = 16817, (17001, 17002)


class ClusterError(RuntimeError):
    pass


def _conf(folder: Path, host: str, cpus: int) -> str:
    return f"""\
ClusterName=launchertest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={CTLD_PORT}
AuthType=auth/munge
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation={folder}/state
SlurmdSpoolDir={folder}/spool-%n
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd-%n.pid
SlurmctldLogFile={folder}/slurmctld.log
SlurmdLogFile={folder}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
ReturnToService=2
MpiDefault=none
JobRequeue=1
KillWait=30
SlurmctldTimeout=30
SlurmdTimeout=30
MinJobAge=600
NodeName=node[1-2] NodeHostname={host} NodeAddr=127.0.0.1 Port=[{NODE_PORTS[0]}-{NODE_PORTS[1]}] CPUs={cpus} \
RealMemory=2000 State=UNKNOWN
PartitionName=debug Nodes=node[1-2] Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""


class LocalCluster:
    def __init__(self, folder: Path):
        self.folder = folder
        self.conf = folder / "slurm.conf"
        self.started: list[Path] = []  # pid files of the daemons started here

    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def run(self, *cmd: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, env=self.env(), capture_output=True, text=True, timeout=timeout, check=False)

    def start(self, wait_s: float = 60) -> LocalCluster:
        self._install()
        for port in (CTLD_PORT, *NODE_PORTS):
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    raise ClusterError(f"port {port} is taken (another SLURM daemon?); the test cluster needs it")
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "state").mkdir(exist_ok=True)
        self.conf.write_text(_conf(self.folder, socket.gethostname(), os.cpu_count() or 1))
        self._start_munge()
        self._daemon("slurmctld", "-i")
        for node in ("node1", "node2"):
            self._daemon("slurmd", "-N", node)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            states = self.run("sinfo", "-h", "-N", "-o", "%N %t").stdout.split()
            if states.count("idle") == 2:
                return self
            time.sleep(0.5)
        self.stop()
        raise ClusterError(f"the nodes did not become idle within {wait_s} s: sinfo says {states}; {self._logs()}")

    def stop(self) -> None:
        for pid_file in reversed(self.started):
            with contextlib.suppress(OSError, ValueError):
                os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)
        self.started.clear()  # (munged stays up: other users of the machine may rely on it)

    def _install(self) -> None:
        missing = [
            p for p, exe in zip(PACKAGES, ("slurmctld", "slurmd", "sbatch", "munged"), strict=True) if not _which(exe)
        ]
        if not missing:
            return
        if os.geteuid() != 0:
            raise ClusterError(f"{', '.join(missing)} missing, and installing them needs root")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        proc = subprocess.run(
            ["apt-get", "install", "-y", "-q", *PACKAGES], env=env, capture_output=True, text=True, check=False
        )
        if proc.returncode != 0:
            update = subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, text=True, check=False)
            proc = subprocess.run(
                ["apt-get", "install", "-y", "-q", *PACKAGES], env=env, capture_output=True, text=True, check=False
            )
            if proc.returncode != 0:
                raise ClusterError(f"apt-get install {' '.join(PACKAGES)} failed: {proc.stderr[-500:]}{update.stderr}")

    def _start_munge(self) -> None:
        if subprocess.run(["pgrep", "-x", "munged"], capture_output=True, check=False).returncode == 0:
            return
        Path("/run/munge").mkdir(parents=True, exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        key = Path("/etc/munge/munge.key")
        if not key.exists():
            subprocess.run(["mungekey", "--create"], capture_output=True, check=False)
            shutil.chown(key, "munge", "munge")
        proc = subprocess.run(
            ["su", "-s", "/bin/sh", "munge", "-c", "/usr/sbin/munged"], capture_output=True, text=True
        )
        if proc.returncode != 0:
            proc = subprocess.run([_which("munged") or "munged", "--force"], capture_output=True, text=True)
        if proc.returncode != 0:
            raise ClusterError(f"munged did not start: {proc.stderr.strip()}")

    def _daemon(self, name: str, *args: str) -> None:
        exe = _which(name)
        proc = subprocess.run([exe or name, *args], env=self.env(), capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise ClusterError(f"{name} {' '.join(args)} did not start: {proc.stderr.strip()} {self._logs()}")
        node = args[-1] if name == "slurmd" else ""
        pid_file = self.folder / (f"slurmd-{node}.pid" if node else "slurmctld.pid")
        for _ in range(50):
            if pid_file.exists():
                break
            time.sleep(0.1)
        self.started.append(pid_file)

    def _logs(self) -> str:
        tails = []
        for log in sorted(self.folder.glob("*.log")):
            tails.append(f"{log.name}: " + " | ".join(log.read_text().splitlines()[-5:]))
        return " ".join(tails)


def _which(name: str) -> str | None:
    return shutil.which(name) or next(
        (str(Path(d) / name) for d in ("/usr/sbin", "/usr/bin") if (Path(d) / name).exists()), None
    )
