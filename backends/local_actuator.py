"""The local backend's actuator: workers and the frontend as processes on 127.0.0.1.

What it started is written down in the cluster folder (one record per process),
which is all a restarted controller needs to find its workers again.  Workers are
forked from a zygote that imported torch and gRPC once (`zygote.py`), which takes a
new worker from about 3 s to a fraction of one; MOECLUSTER_ZYGOTE=0 starts each as a
fresh interpreter instead.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from moecluster.backends import cluster_record, zygote
from moecluster.backends.processes import ProcessError, ProcessRecord, alive, spawn, stop, unrecorded
from moecluster.controller.actuator import WorkerHandle

log = logging.getLogger(__name__)
WORKER_MODULES = ("moecluster.workers.server", "moecluster.backends.zygote")  # a zygote's forks keep its command line


class LocalActuator:
    def __init__(self, cluster_dir: Path, model: str, *, frontend_port: int, worker_threads: int = 1,
                 grace: float = 5.0, worker_device: str = "cpu", frontend_device: str = "cpu",
                 worker_flags: list[str] | None = None, frontend_flags: list[str] | None = None):
        """`worker_flags`, `frontend_flags`: more flags for those processes (the spec's serving settings)."""
        self.dir = Path(cluster_dir)
        self.worker_device, self.frontend_device = worker_device, frontend_device
        self.worker_flags, self.frontend_flags = list(worker_flags or ()), list(frontend_flags or ())
        self.model = model
        self.frontend_port = frontend_port
        self.worker_threads = worker_threads
        self.grace = grace
        self._lock = threading.Lock()
        for sub in ("workers", "run", "logs"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)

    def _record_path(self, worker_id: str) -> Path:
        return self.dir / "workers" / f"{worker_id}.json"

    def start_worker(self, worker_id: str, timeout: float) -> WorkerHandle:
        path = self._record_path(worker_id)
        if path.is_file():
            record = ProcessRecord.load(path)
            if alive(record) and record.address:
                return WorkerHandle(worker_id, record.address, record.pid)
            stop(record, self.grace)  # half-started by a controller that died: start it afresh
        index = ["--index", str(self.dir / "index.json")] if (self.dir / "index.json").is_file() else []
        args = ["--checkpoint", self.model, *index, "--experts", "", "--worker-id", worker_id,
                "--threads", str(self.worker_threads), "--device", self.worker_device, "--grace", str(self.grace),
                *self.worker_flags]
        launcher = self._zygote_launcher(timeout) if os.environ.get("MOECLUSTER_ZYGOTE", "1") != "0" else None
        try:
            record = spawn(worker_id, "moecluster.workers.server", args, self.dir / "run", self.dir / "logs", timeout,
                           record_at=path, launcher=launcher)
        except OSError as err:  # the zygote went away between the check and the fork
            if launcher is None:
                raise
            log.warning("worker zygote failed (%s); starting %s as a fresh process", err, worker_id)
            record = spawn(worker_id, "moecluster.workers.server", args, self.dir / "run", self.dir / "logs", timeout,
                           record_at=path)
        return WorkerHandle(worker_id, record.address, record.pid)

    def _zygote_launcher(self, timeout: float):
        """A launcher forking from this cluster's zygote (started on first use); None if it cannot start."""
        path = self.dir / "zygote.json"
        with self._lock:
            record = ProcessRecord.load(path) if path.is_file() else None
            if record is None or not alive(record):
                try:
                    record = spawn("zygote", "moecluster.backends.zygote", ["--socket", str(zygote.socket_path(self.dir))],
                                   self.dir / "run", self.dir / "logs", timeout, record_at=path)
                except (OSError, ProcessError) as err:
                    log.warning("worker zygote did not start (%s); starting workers as fresh processes", err)
                    return None
        sock = Path(record.address)
        return lambda argv, logfile: zygote.fork_worker(sock, argv, logfile)

    def stop_worker(self, worker_id: str) -> None:
        path = self._record_path(worker_id)
        if path.is_file():
            stop(ProcessRecord.load(path), self.grace)
            path.unlink(missing_ok=True)

    def workers(self) -> list[WorkerHandle]:
        handles, recorded = [], set()
        for path in sorted((self.dir / "workers").glob("*.json")):
            record = ProcessRecord.load(path)
            recorded.add(record.pid)
            if alive(record) and record.address:
                handles.append(WorkerHandle(record.id, record.address, record.pid))
                continue
            # Died while nobody watched, or half-started when the last controller died: stop it,
            # forget it; the controller starts a fresh one if the spec still wants it.
            stop(record, self.grace)
            path.unlink(missing_ok=True)
        zygote_record = self.dir / "zygote.json"
        if zygote_record.is_file():
            recorded.add(ProcessRecord.load(zygote_record).pid)
        # Forked for a controller killed before it wrote the record down: empty, known to nobody, stopped.
        for orphan in unrecorded(str(self.dir / "run"), recorded, WORKER_MODULES):
            log.warning("stopping worker process %d, which no record names (its starter died)", orphan.pid)
            stop(orphan, self.grace)
        return handles

    def start_frontend(self, controller_address: str, timeout: float) -> WorkerHandle:
        path = self.dir / "frontend.json"
        if path.is_file():
            record = ProcessRecord.load(path)
            if alive(record) and record.address:
                return WorkerHandle("frontend", record.address, record.pid)
            stop(record, self.grace)
        args = ["--checkpoint", self.model, "--controller", controller_address, "--port", str(self.frontend_port),
                "--device", self.frontend_device, *self.frontend_flags]
        record = spawn("frontend", "moecluster.frontend.server", args,
                       self.dir / "run", self.dir / "logs", timeout, record_at=path)
        if not self.frontend_port:  # `up --port 0`: the first frontend took a free port; later ones keep it
            self.frontend_port = int(record.address.rsplit(":", 1)[1])
            cluster_record.update(self.dir, frontend_port=self.frontend_port)
        return WorkerHandle("frontend", record.address, record.pid)

    def frontend_alive(self) -> bool:
        path = self.dir / "frontend.json"
        return path.is_file() and alive(ProcessRecord.load(path))

    def stop_all(self) -> None:
        path = self.dir / "frontend.json"
        if path.is_file():
            stop(ProcessRecord.load(path), self.grace)
            path.unlink(missing_ok=True)
        for path in sorted((self.dir / "workers").glob("*.json")):
            self.stop_worker(path.stem)
        path = self.dir / "zygote.json"
        if path.is_file():
            stop(ProcessRecord.load(path), self.grace)
            path.unlink(missing_ok=True)
        zygote.socket_path(self.dir).unlink(missing_ok=True)  # left behind by a zygote killed -9
