"""The local backend: a frontend and expert workers as processes on 127.0.0.1.

Each named cluster keeps its state in `$MOECLUSTER_HOME/clusters/NAME/`
(default `~/.moecluster`): what it started (pids, addresses), the routing table
and the logs, so `moectl status` and `moectl down` work from any shell, and
`down` stops exactly the processes `up` started, by pid, checked against their
command line so a recycled pid is never touched.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from moecluster.controller.static_placement import static_placement
from moecluster.frontend.routing import RoutingTable
from moecluster.models.checkpoint import Checkpoint

Progress = Callable[[str], None]


class ClusterError(RuntimeError):
    """Something a user can act on: the text says what and what to do."""


@dataclass
class ProcessRecord:
    role: str  # "worker" or "frontend"
    id: str
    pid: int
    address: str
    log: str


@dataclass
class ClusterRecord:
    name: str
    model: str
    endpoint: str
    replicas: int
    frontend: ProcessRecord
    workers: list[ProcessRecord] = field(default_factory=list)

    @classmethod
    def from_dict(cls, data: dict) -> "ClusterRecord":
        return cls(data["name"], data["model"], data["endpoint"], data["replicas"], ProcessRecord(**data["frontend"]),
                   [ProcessRecord(**w) for w in data["workers"]])


def home() -> Path:
    return Path(os.environ.get("MOECLUSTER_HOME", Path.home() / ".moecluster"))


def cluster_names() -> list[str]:
    root = home() / "clusters"
    return sorted(p.name for p in root.iterdir() if (p / "cluster.json").is_file()) if root.is_dir() else []


class LocalCluster:
    def __init__(self, name: str = "default"):
        if not name or not all(c.isalnum() or c in "-_" for c in name):
            raise ClusterError(f"cluster name {name!r}: use letters, digits, '-' and '_'")
        self.name = name
        self.dir = home() / "clusters" / name
        self._children: dict[str, subprocess.Popen] = {}  # processes this object started, by id

    # -- state -------------------------------------------------------------

    def record(self) -> ClusterRecord:
        path = self.dir / "cluster.json"
        if not path.is_file():
            raise ClusterError(f"no cluster named {self.name!r} is up (start one with `moectl up --name {self.name} ...`)")
        return ClusterRecord.from_dict(json.loads(path.read_text()))

    def _save(self, record: ClusterRecord) -> None:
        tmp = self.dir / "cluster.json.tmp"
        tmp.write_text(json.dumps(asdict(record), indent=2))
        tmp.replace(self.dir / "cluster.json")

    def processes(self) -> list[ProcessRecord]:
        record = self.record()
        return [record.frontend, *record.workers]

    # -- up ------------------------------------------------------------------

    def up(self, model: str | Path, *, workers: int = 2, replicas: int = 1, port: int = 50051,
           worker_threads: int = 1, timeout: float = 180.0, progress: Progress = lambda _: None) -> ClusterRecord:
        """Starts N workers (static placement, R copies of every expert) and a frontend on `port`; waits until they serve."""
        if (self.dir / "cluster.json").is_file():
            if any(_alive(p) for p in self.processes()):
                raise ClusterError(f"cluster {self.name!r} is already up; `moectl down --name {self.name}` first")
            shutil.rmtree(self.dir)
        if workers < 1:
            raise ClusterError(f"--workers must be at least 1, got {workers}")
        if not 1 <= replicas <= workers:
            raise ClusterError(f"--replicas must be between 1 and --workers ({workers}), got {replicas}")
        if not _port_free(port):
            raise ClusterError(f"port {port} on 127.0.0.1 is in use; pick another with --port")
        model = Path(model).resolve()
        checkpoint = Checkpoint(model)  # fails early, with a clear message, on a bad checkpoint
        g = checkpoint.geometry
        ids = [f"worker-{i}" for i in range(workers)]
        placement = static_placement(g.moe_layers, g.num_experts, ids, replicas)
        (self.dir / "logs").mkdir(parents=True)
        (self.dir / "run").mkdir()
        started: list[ProcessRecord] = []
        try:
            for worker_id in ids:
                keys = [k for k, holders in placement.items() if worker_id in holders]
                spec = ",".join(f"{layer}:{expert}" for layer, expert in keys)
                started.append(self._spawn("worker", worker_id, [
                    "-m", "moecluster.workers.server", "--checkpoint", str(model), "--experts", spec,
                    "--worker-id", worker_id, "--threads", str(worker_threads)]))
            self._wait_ready(started, timeout, progress, "workers")
            table = RoutingTable(1, {p.id: p.address for p in started}, placement)
            table.save(self.dir / "routing.json")
            frontend = self._spawn("frontend", "frontend", [
                "-m", "moecluster.frontend.server", "--checkpoint", str(model), "--routing",
                str(self.dir / "routing.json"), "--port", str(port)])
            started.append(frontend)
            self._wait_ready([frontend], timeout, progress, "frontend")
        except BaseException:
            for process in reversed(started):
                _stop(process, grace=2.0)
            shutil.rmtree(self.dir, ignore_errors=True)
            raise
        record = ClusterRecord(self.name, str(model), frontend.address, replicas, frontend, started[:-1])
        self._save(record)
        return record

    def _spawn(self, role: str, process_id: str, args: list[str]) -> ProcessRecord:
        ready = self.dir / "run" / f"{process_id}.ready"
        log = self.dir / "logs" / f"{process_id}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen([sys.executable, *args, "--ready-file", str(ready)], stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        self._children[process_id] = proc
        return ProcessRecord(role, process_id, proc.pid, "", str(log))

    def _wait_ready(self, processes: list[ProcessRecord], timeout: float, progress: Progress, what: str) -> None:
        deadline = time.monotonic() + timeout
        pending = {p.id: p for p in processes}
        last = -1
        while pending:
            for process_id, process in list(pending.items()):
                ready = self.dir / "run" / f"{process_id}.ready"
                if ready.is_file():
                    process.address = json.loads(ready.read_text())["address"]
                    del pending[process_id]
                elif self._children[process_id].poll() is not None:
                    raise ClusterError(f"{process.role} {process_id} exited while starting; its log ({process.log}) ends:\n"
                                       + _tail(process.log))
            done = len(processes) - len(pending)
            if done != last:
                progress(f"{what}: {done}/{len(processes)} serving")
                last = done
            if pending and time.monotonic() > deadline:
                raise ClusterError(f"{what} not serving after {timeout:.0f}s: {sorted(pending)}; logs in {self.dir / 'logs'}")
            if pending:
                time.sleep(0.1)

    # -- down ------------------------------------------------------------------

    def down(self, grace: float = 5.0) -> list[ProcessRecord]:
        """Stops every process of the cluster (frontend first) and forgets it; returns those stopped."""
        record = self.record()
        stopped = [p for p in [record.frontend, *reversed(record.workers)] if _stop(p, grace)]
        shutil.rmtree(self.dir, ignore_errors=True)
        return stopped


def _alive(process: ProcessRecord) -> bool:
    """True when `process.pid` runs and is still the process we started (its command line names our log's cluster)."""
    try:
        cmdline = Path(f"/proc/{process.pid}/cmdline").read_bytes().decode(errors="replace")
        with open(f"/proc/{process.pid}/stat") as stat:
            state = stat.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z" and str(Path(process.log).parent.parent) in cmdline


def _stop(process: ProcessRecord, grace: float) -> bool:
    """SIGTERM, then SIGKILL after `grace` seconds; only if the pid is still ours."""
    if not _alive(process):
        _reap(process.pid)
        return False
    os.kill(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while _alive(process) and time.monotonic() < deadline:
        _reap(process.pid)
        time.sleep(0.05)
    if _alive(process):
        os.kill(process.pid, signal.SIGKILL)
        while _alive(process):
            _reap(process.pid)
            time.sleep(0.02)
    _reap(process.pid)
    return True


def _reap(pid: int) -> None:
    """Collects the exit status when the process is our child (no zombies left behind)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _port_free(port: int) -> bool:
    if port == 0:
        return True
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _tail(path: str, lines: int = 15) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
