"""The local backend as `moectl` sees it: a named cluster in `$MOECLUSTER_HOME/clusters/NAME/`.

`up` writes the spec and starts the controller process, which starts the
workers and the frontend; every later verb talks to the controller over gRPC.
`down` asks the controller to stop everything and, should it not answer,
stops by pid whatever the cluster's records name.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
from moecluster.backends.processes import ProcessError, ProcessRecord, alive, spawn, stop, tail
from moecluster.controller.spec import ClusterSpec
from moecluster.models.checkpoint import Checkpoint
from moecluster.protos import controller_pb2, controller_pb2_grpc

Progress = Callable[[str], None]


class ClusterError(RuntimeError):
    """Something a user can act on: the text says what and what to do."""


def home() -> Path:
    return Path(os.environ.get("MOECLUSTER_HOME", Path.home() / ".moecluster"))


def cluster_names() -> list[str]:
    root = home() / "clusters"
    return sorted(p.name for p in root.iterdir() if (p / "cluster.json").is_file()) if root.is_dir() else []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class LocalCluster:
    def __init__(self, name: str = "default"):
        if not name or not all(c.isalnum() or c in "-_" for c in name):
            raise ClusterError(f"cluster name {name!r}: use letters, digits, '-' and '_'")
        self.name = name
        self.dir = home() / "clusters" / name

    # -- records -------------------------------------------------------------

    def info(self) -> dict:
        path = self.dir / "cluster.json"
        if not path.is_file():
            raise ClusterError(f"no cluster named {self.name!r} is up (start one with `moectl up --name {self.name} ...`)")
        return json.loads(path.read_text())

    def spec(self) -> ClusterSpec:
        return ClusterSpec.model_validate_json((self.dir / "spec.json").read_text())

    def controller_record(self) -> ProcessRecord | None:
        path = self.dir / "controller.json"
        return ProcessRecord.load(path) if path.is_file() else None

    def records(self) -> list[ProcessRecord]:
        """Every process the cluster's records name: controller, frontend, workers, the worker zygote."""
        paths = [self.dir / "controller.json", self.dir / "frontend.json", *sorted((self.dir / "workers").glob("*.json")),
                 self.dir / "zygote.json"]
        return [ProcessRecord.load(p) for p in paths if p.is_file()]

    # -- up ------------------------------------------------------------------

    def up(self, model: str | Path, *, workers: int = 2, replicas: int = 1, port: int = 50051, worker_threads: int = 1,
           capacity: int | None = None, timeout: float = 300.0, progress: Progress = lambda _: None,
           snapshot_dir: str | Path | None = None, snapshot_every_s: float | None = None) -> dict:
        """Writes the spec, starts the controller, and waits until the pool serves."""
        if (self.dir / "cluster.json").is_file():
            controller = self.controller_record()
            if controller is not None and alive(controller):
                raise ClusterError(f"cluster {self.name!r} is already up; `moectl down --name {self.name}` first")
            if any(alive(r) for r in self.records()):
                raise ClusterError(f"cluster {self.name!r} has processes but no controller; "
                                   f"`moectl resume --name {self.name}` restarts it, `moectl down` stops them")
            shutil.rmtree(self.dir)
        if workers < 1:
            raise ClusterError(f"--workers must be at least 1, got {workers}")
        if not 1 <= replicas <= workers:
            raise ClusterError(f"--replicas must be between 1 and --workers ({workers}), got {replicas}")
        if port and not port_free(port):
            raise ClusterError(f"port {port} on 127.0.0.1 is in use; pick another with --port")
        model = Path(model).resolve()
        Checkpoint(model)  # fails early, with a clear message, on a bad checkpoint
        if snapshot_dir is not None:
            snapshot_dir = Path(snapshot_dir).resolve()
            snapshot_dir.mkdir(parents=True, exist_ok=True)
        spec = ClusterSpec(name=self.name, model=str(model), workers=workers, min_replicas=replicas, capacity=capacity,
                           snapshot_dir=str(snapshot_dir) if snapshot_dir else None, snapshot_every_s=snapshot_every_s)
        self.dir.mkdir(parents=True)
        (self.dir / "spec.json").write_text(spec.model_dump_json(indent=2))
        info = {"name": self.name, "model": str(model), "frontend_port": port or free_port(),
                "controller": f"127.0.0.1:{free_port()}", "worker_threads": worker_threads}
        (self.dir / "cluster.json").write_text(json.dumps(info, indent=2))
        try:
            self.start_controller()
            self.wait_converged(timeout, progress)
        except BaseException:
            self.down(grace=2.0)
            raise
        return self.status()

    def start_controller(self, timeout: float = 120.0) -> ProcessRecord:
        """Starts (or restarts) the controller process; it rebuilds its view from the workers."""
        for sub in ("run", "logs", "workers"):
            (self.dir / sub).mkdir(exist_ok=True)
        try:
            return spawn("controller", "moecluster.backends.local_controller", ["--cluster-dir", str(self.dir)],
                         self.dir / "run", self.dir / "logs", timeout, record_at=self.dir / "controller.json")
        except ProcessError as err:
            raise ClusterError(str(err)) from None

    def wait_converged(self, timeout: float, progress: Progress) -> dict:
        deadline = time.monotonic() + timeout
        last = ""
        while True:
            try:
                status = self.status(rpc_timeout=2.0)
            except ClusterError:
                status = None
            if status is not None:
                serving = sum(1 for w in status["workers"] if w["state"] == "serving")
                line = f"workers {serving}/{status['desired_workers']} serving, epoch {status['epoch']}"
                if line != last:
                    progress(line)
                    last = line
                if status["converged"] and status["endpoint"]:
                    progress(f"frontend serving on {status['endpoint']}")
                    return status
            controller = self.controller_record()
            if controller is not None and not alive(controller):
                raise ClusterError(f"the controller exited; its log ({controller.log}) ends:\n"
                                   + tail(controller.log))
            if time.monotonic() > deadline:
                raise ClusterError(f"cluster {self.name!r} not serving after {timeout:.0f}s; logs in {self.dir / 'logs'}"
                                   + (f"; last error: {status['last_error']}" if status and status["last_error"] else ""))
            time.sleep(0.2)

    # -- talking to the controller -------------------------------------------------

    def _stub(self) -> tuple[grpc.Channel, controller_pb2_grpc.ControllerStub]:
        channel = grpc.insecure_channel(self.info()["controller"])
        return channel, controller_pb2_grpc.ControllerStub(channel)

    def status(self, rpc_timeout: float = 10.0) -> dict:
        channel, stub = self._stub()
        try:
            s = stub.Status(controller_pb2.StatusRequest(), timeout=rpc_timeout)
        except grpc.RpcError as err:
            raise ClusterError(f"controller of {self.name!r} did not answer ({err.code().name}); "
                               f"`moectl resume --name {self.name}` restarts it") from None
        finally:
            channel.close()
        return {
            "name": s.name, "endpoint": s.endpoint, "epoch": s.epoch, "desired_workers": s.desired_workers,
            "min_replicas": s.min_replicas, "converged": s.converged, "last_error": s.last_error,
            "imbalance": round(s.imbalance, 4), "frontends": list(s.frontends), "controller": self.info()["controller"],
            "step": s.step, "snapshot": s.snapshot,
            "rollbacks": [{"layer": r.layer, "expert": r.expert, "snapshot_step": r.snapshot_step, "step": r.step,
                           "source": r.source} for r in s.rollbacks],
            "workers": [{"id": w.id, "address": w.address, "pid": w.pid, "state": w.state,
                         "experts": [[l, e] for l, e in zip(w.experts[::2], w.experts[1::2])], "load": w.load}
                        for w in s.workers],
        }

    def _stream(self, call: str, request, timeout: float) -> Iterator[str]:
        channel, stub = self._stub()
        try:
            for progress in getattr(stub, call)(request, timeout=timeout):
                if not progress.done:
                    yield progress.message
        except grpc.RpcError as err:
            raise ClusterError(f"{call.lower()} failed: {err.details() or err.code().name}") from None
        finally:
            channel.close()

    def scale(self, workers: int, timeout: float = 600.0) -> Iterator[str]:
        return self._stream("Scale", controller_pb2.ScaleRequest(workers=workers), timeout)

    def drain(self, worker_id: str, timeout: float = 600.0) -> Iterator[str]:
        return self._stream("Drain", controller_pb2.DrainRequest(worker=worker_id), timeout)

    def snapshot(self, directory: str | Path | None = None, timeout: float = 600.0) -> Iterator[str]:
        directory = str(Path(directory).resolve()) if directory else ""
        if directory:
            Path(directory).mkdir(parents=True, exist_ok=True)
        return self._stream("Snapshot", controller_pb2.SnapshotRequest(directory=directory), timeout)

    def migrate(self, layer: int, expert: int, to: str, source: str = "", timeout: float = 600.0) -> Iterator[str]:
        request = controller_pb2.MigrateRequest(layer=layer, expert=expert, to_worker=to, from_worker=source)
        return self._stream("Migrate", request, timeout)

    # -- down ------------------------------------------------------------------

    def down(self, grace: float = 5.0) -> list[ProcessRecord]:
        """Stops every process of the cluster and forgets it; returns those that were running."""
        self.info()
        running = [r for r in self.records() if alive(r)]
        controller = self.controller_record()
        if controller is not None and alive(controller):
            channel, stub = self._stub()
            try:
                stub.Shutdown(controller_pb2.ShutdownRequest(), timeout=5)
                deadline = time.monotonic() + 30 + grace
                while alive(controller) and time.monotonic() < deadline:
                    time.sleep(0.05)
            except grpc.RpcError:
                pass  # not answering: stop by pid below
            finally:
                channel.close()
        for record in self.records():  # whatever the controller did not stop
            stop(record, grace)
        shutil.rmtree(self.dir, ignore_errors=True)
        return running

