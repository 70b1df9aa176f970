"""A cluster as `moectl` sees it: a name, and its folder `$MOECLUSTER_HOME/clusters/NAME/`.

`up` writes the spec and starts the controller (a local process, or on the Ray
backend a detached Ray actor), which starts the workers and the frontend; every
later verb talks to the controller over gRPC. `down` asks the controller to
stop everything and, should it not answer, stops by pid whatever the cluster's
records name (on Ray: kills its actors by name).
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
from moecluster.backends import cluster_record
from moecluster.backends.local_actuator import WORKER_MODULES
from moecluster.backends.local_supervisor import RECORD as SUPERVISOR_RECORD
from moecluster.backends.local_supervisor import start_supervisor
from moecluster.backends.processes import ProcessError, ProcessRecord, alive, spawn, stop, tail, unrecorded
from moecluster.controller.spec import GENERATE_PAGE_TOKENS, ClusterSpec
from moecluster.models.checkpoint import Checkpoint
from moecluster.models.devices import resolve_device
from moecluster.protos import controller_pb2, controller_pb2_grpc
from moecluster.wire import access, endpoints, retry
from moecluster.wire import internal_tls as internal_tls_files

Progress = Callable[[str], None]
# What a local cluster runs; `down` stops any of them naming its run folder, recorded or not.
OUR_MODULES = (*WORKER_MODULES, "moecluster.frontend.server", "moecluster.backends.local_controller",
               "moecluster.backends.local_supervisor")


class ClusterError(RuntimeError):
    """Something a user can act on: the text says what and what to do."""


def home() -> Path:
    return Path(os.environ.get("MOECLUSTER_HOME", Path.home() / ".moecluster"))


def cluster_names() -> list[str]:
    root = home() / "clusters"
    return sorted(p.name for p in root.iterdir() if (p / cluster_record.FILE).is_file()) if root.is_dir() else []


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


def _access_files(backend: str, api_keys, tls_cert, tls_key) -> dict[str, str]:
    """The frontend's API keys and TLS files as the spec's fields, absolute (the frontend runs elsewhere), each
    read once here so that a bad one fails `up` with its flag's name."""
    if not (api_keys or tls_cert or tls_key):
        return {}
    if backend != "local":
        raise ClusterError("--api-keys and --tls-cert/--tls-key are the local frontend's; on Ray, clients reach the "
                           "frontends through Serve's proxies: set TLS there")
    if bool(tls_cert) != bool(tls_key):
        raise ClusterError("TLS needs both --tls-cert and --tls-key")
    try:
        if api_keys:
            access.ApiKeys(api_keys)
    except ValueError as err:
        raise ClusterError(f"--api-keys: {err}") from None
    try:
        if tls := access.tls_files(tls_cert, tls_key):
            access.server_credentials(*tls)
    except ValueError as err:
        raise ClusterError(f"--tls-cert/--tls-key: {err}") from None
    files = {"api_keys_file": api_keys, "tls_cert_file": tls_cert, "tls_key_file": tls_key}
    return {field: str(Path(path).resolve()) for field, path in files.items() if path}


class LocalCluster:
    def __init__(self, name: str = "default"):
        if not name or not all(c.isalnum() or c in "-_" for c in name):
            raise ClusterError(f"cluster name {name!r}: use letters, digits, '-' and '_'")
        self.name = name
        self.dir = home() / "clusters" / name

    # -- records -------------------------------------------------------------

    def info(self) -> dict:
        if not (self.dir / cluster_record.FILE).is_file():
            raise ClusterError(f"no cluster named {self.name!r} is up (start one with `moectl up --name {self.name} ...`)")
        return cluster_record.read(self.dir)

    def spec(self) -> ClusterSpec:
        return ClusterSpec.model_validate_json((self.dir / "spec.json").read_text())

    @property
    def backend(self) -> str:
        return self.info().get("backend", "local")

    def controller_running(self) -> bool:
        if self.backend == "ray":
            from moecluster.backends import ray_cluster

            ray_cluster.connect(self.info()["ray_address"])
            return ray_cluster.controller_address(self.name) is not None
        controller = self.controller_record()
        return controller is not None and alive(controller)

    def controller_record(self) -> ProcessRecord | None:
        path = self.dir / "controller.json"
        return ProcessRecord.load(path) if path.is_file() else None

    def supervisor_record(self) -> ProcessRecord | None:
        """The process that starts the controller again when it dies (`local_supervisor.py`)."""
        path = self.dir / SUPERVISOR_RECORD
        return ProcessRecord.load(path) if path.is_file() else None

    def supervised(self) -> bool:
        supervisor = self.supervisor_record()
        return supervisor is not None and alive(supervisor)

    def frontend_record(self) -> ProcessRecord | None:
        path = self.dir / "frontend.json"
        return ProcessRecord.load(path) if path.is_file() else None

    def wait_new_frontend(self, killed_pid: int, timeout: float = 60.0) -> ProcessRecord | None:
        """The frontend the controller started in place of `killed_pid`, once it serves; None after `timeout`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            record = self.frontend_record()
            if record is not None and record.pid != killed_pid and record.address and alive(record):
                return record
            time.sleep(0.1)
        return None

    def records(self) -> list[ProcessRecord]:
        """Every process the cluster's records name: the controller's supervisor (first: it would restart the
        controller), the controller, frontend, workers, the worker zygote."""
        paths = [self.dir / SUPERVISOR_RECORD, self.dir / "controller.json", self.dir / "frontend.json",
                 *sorted((self.dir / "workers").glob("*.json")), self.dir / "zygote.json", self.dir / "ray-head.json"]
        return [ProcessRecord.load(p) for p in paths if p.is_file()]

    # -- up ------------------------------------------------------------------

    def up(self, model: str | Path, *, workers: int = 2, replicas: int = 1, port: int = 50051, worker_threads: int = 1,
           capacity: int | None = None, timeout: float = 300.0, progress: Progress = lambda _: None,
           snapshot_dir: str | Path | None = None, snapshot_every_s: float | None = None, snapshot_keep: int = 3,
           backend: str = "local",
           ray_address: str | None = None, serve_grpc_port: int | None = None, standby: int = 0,
           worker_device: str = "cpu", frontend_device: str = "cpu", colocate: bool = False,
           rebalance_above: float = 1.3, max_replicas: int | None = None, rebalance_min_load: float = 50.0,
           worker_batch_tokens: int | None = None, worker_compute_threads: int | None = None,
           generate_cache_tokens: int | None = None, forward_batch_tokens: int | None = None,
           api_keys: str | Path | None = None, tls_cert: str | Path | None = None, tls_key: str | Path | None = None,
           internal_tls: bool = False) -> dict:
        """Writes the spec, starts the controller, and waits until the pool serves. `backend` "ray" runs
        it all as Ray actors, on the Ray instance at `ray_address` (None: a new one on this machine).
        The serving settings left None are the processes' defaults (ClusterSpec says what each does).
        `api_keys`, `tls_cert` and `tls_key` are files the frontend serves clients with (wire/access.py);
        `internal_tls`: the cluster's parts call each other over mutual TLS, under a CA made for it (internal_tls.py)."""
        if backend not in ("local", "ray"):
            raise ClusterError(f"--backend {backend!r}: choose local or ray")
        if serve_grpc_port and backend != "ray":
            raise ClusterError("--serve-grpc-port is for --backend ray (the local frontend serves gRPC on --port)")
        if (self.dir / cluster_record.FILE).is_file():
            if self.controller_running():
                raise ClusterError(f"cluster {self.name!r} is already up; `moectl down --name {self.name}` first")
            if any(alive(r) for r in self.records()):
                raise ClusterError(f"cluster {self.name!r} has processes but no controller; "
                                   f"`moectl resume --name {self.name}` restarts it, `moectl down` stops them")
            shutil.rmtree(self.dir)
        if workers < 1:
            raise ClusterError(f"--workers must be at least 1, got {workers}")
        if not rebalance_above > 1:
            raise ClusterError(f"--rebalance-above must be over 1 (1 is an even split), got {rebalance_above}")
        if rebalance_min_load < 0:
            raise ClusterError(f"--rebalance-min-load is tokens/s, at least 0; got {rebalance_min_load}")
        if max_replicas is not None and max_replicas < replicas:
            raise ClusterError(f"--max-replicas ({max_replicas}) is below --replicas ({replicas}): every expert has "
                               f"--replicas copies, hot ones up to --max-replicas")
        if not 1 <= replicas <= workers:
            raise ClusterError(f"--replicas must be between 1 and --workers ({workers}), got {replicas}")
        if worker_batch_tokens is not None and worker_batch_tokens < 0:
            raise ClusterError(f"--worker-batch-tokens is tokens a call, at least 0 (0: each request alone); "
                               f"got {worker_batch_tokens}")
        if worker_compute_threads is not None and worker_compute_threads < 1:
            raise ClusterError(f"--worker-compute-threads must be at least 1, got {worker_compute_threads}")
        if generate_cache_tokens is not None and generate_cache_tokens != 0 and generate_cache_tokens < GENERATE_PAGE_TOKENS:
            raise ClusterError(f"--generate-cache-tokens must be 0 (each generation alone) or at least one "
                               f"{GENERATE_PAGE_TOKENS}-token page; got {generate_cache_tokens}")
        if forward_batch_tokens is not None and forward_batch_tokens < 0:
            raise ClusterError(f"--forward-batch-tokens is tokens a forward, at least 0 (0: each request alone); "
                               f"got {forward_batch_tokens}")
        access_files = _access_files(backend, api_keys, tls_cert, tls_key)
        if port and not port_free(port):
            raise ClusterError(f"port {port} on 127.0.0.1 is in use; pick another with --port")
        if backend == "local":  # Ray actors check theirs on the node they land on
            for flag, device in (("--worker-device", worker_device), ("--frontend-device", frontend_device)):
                try:
                    resolve_device(device)
                except ValueError as err:
                    raise ClusterError(str(err).replace("--device", flag)) from None
        model = Path(model).resolve()
        checkpoint = Checkpoint(model)  # fails early, with a clear message, on a bad checkpoint
        if snapshot_dir is not None:
            snapshot_dir = Path(snapshot_dir).resolve()
            snapshot_dir.mkdir(parents=True, exist_ok=True)
        spec = ClusterSpec(name=self.name, model=str(model), workers=workers, min_replicas=replicas, capacity=capacity,
                           snapshot_dir=str(snapshot_dir) if snapshot_dir else None, snapshot_every_s=snapshot_every_s,
                           snapshot_keep=snapshot_keep,
                           serve_grpc_port=serve_grpc_port, standby_workers=standby, worker_device=worker_device,
                           frontend_device=frontend_device, colocate=colocate, rebalance_above=rebalance_above,
                           max_replicas=max_replicas, rebalance_min_load=rebalance_min_load,
                           worker_batch_tokens=worker_batch_tokens, worker_compute_threads=worker_compute_threads,
                           generate_cache_tokens=generate_cache_tokens, forward_batch_tokens=forward_batch_tokens,
                           **access_files)
        shutil.rmtree(self.dir, ignore_errors=True)  # the logs an earlier failed `up` kept
        self.dir.mkdir(parents=True)
        (self.dir / "spec.json").write_text(spec.model_dump_json(indent=2))
        checkpoint.save_index(self.dir / "index.json")  # the controller starts from it, without transformers
        info = {"name": self.name, "model": str(model), "frontend_port": port or (free_port() if backend == "ray" else 0),
                "controller": f"127.0.0.1:{free_port()}", "worker_threads": worker_threads, "backend": backend}
        if internal_tls:  # every process of the cluster gets its folder from cluster.json (local_controller.py)
            info["internal_tls"] = str(internal_tls_files.generate(self.dir / "tls", self.name))
        cluster_record.write(self.dir, info)
        try:
            if backend == "ray":
                self._attach_ray(ray_address, timeout, progress)
            self.start_controller(new_port_if_taken=True)  # nothing knows its address yet
            self.wait_converged(timeout, progress)
        except BaseException:
            self.down(grace=2.0, keep_logs=True)  # the error names them
            raise
        return self.status()

    def _attach_ray(self, address: str | None, timeout: float, progress: Progress) -> None:
        """Records the Ray instance to run on; starts one on this machine when no address is given."""
        try:
            from moecluster.backends import ray_cluster
        except ImportError:
            raise ClusterError("the ray backend needs Ray: pip install 'moecluster[ray]'") from None
        for sub in ("run", "logs"):
            (self.dir / sub).mkdir(exist_ok=True)
        if not address:
            progress("starting a Ray instance on this machine")
            try:
                head = spawn("ray-head", "moecluster.backends.ray_head", [], self.dir / "run", self.dir / "logs", timeout,
                             record_at=self.dir / "ray-head.json")
            except ProcessError as err:
                raise ClusterError(str(err)) from None
            address = head.address
        ray_cluster.connect(address)
        host = ray_cluster.node_host()  # the controller actor runs on this node, at the port `up` chose
        info = self.info() | {"ray_address": address, "controller": f"{host}:{self.info()['controller'].rsplit(':', 1)[1]}"}
        cluster_record.write(self.dir, info)

    def start_controller(self, timeout: float = 120.0, new_port_if_taken: bool = False) -> ProcessRecord | None:
        """Starts (or restarts) the controller; it rebuilds its view from the workers. A restarted one keeps its
        address (frontends reconnect to it); a new one (`new_port_if_taken`) moves to another port if its is taken.
        Locally it runs under a supervisor that starts it again when it dies; a supervisor started while the
        controller runs adopts it. Ray restarts its controller actor itself."""
        for sub in ("run", "logs", "workers"):
            (self.dir / sub).mkdir(exist_ok=True)
        if self.backend == "ray":
            from moecluster.backends import ray_cluster

            info = self.info()
            ray_cluster.connect(info["ray_address"])
            attempts = 3 if new_port_if_taken else 1
            for attempt in range(1, attempts + 1):
                try:
                    address = ray_cluster.start_controller(self.dir, self.name, timeout)
                    break
                except ray_cluster.PortTaken as err:
                    if attempt == attempts:
                        raise ClusterError(f"the controller could not listen: {err}") from None
                    info = info | {"controller": f"{info['controller'].rsplit(':', 1)[0]}:{free_port()}"}
                    cluster_record.write(self.dir, info)
            cluster_record.write(self.dir, info | {"controller": address})
            return None
        if self.supervised():
            return self.controller_record()  # it starts the controller again itself
        try:  # ready once the controller serves (or adopts a running one)
            start_supervisor(self.dir, timeout, new_port_if_taken)
        except ProcessError as err:
            controller = self.controller_record()
            if controller is not None and not alive(controller):  # what the supervisor failed on: name it
                raise ClusterError(f"the controller exited while starting; its log ({controller.log}) ends:\n"
                                   + tail(controller.log)) from None
            raise ClusterError(str(err)) from None
        return self.controller_record()

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
            if controller is not None and not alive(controller) and not self.supervised():
                raise ClusterError(f"the controller exited; its log ({controller.log}) ends:\n"
                                   + tail(controller.log))
            if self.backend == "ray" and status is None and not self.controller_running():
                raise ClusterError("the controller actor is gone; see the Ray logs (ray logs cluster)")
            if time.monotonic() > deadline:
                raise ClusterError(f"cluster {self.name!r} not serving after {timeout:g}s ({last or 'no status'})"
                                   + (f"; last error: {status['last_error']}" if status and status["last_error"] else "")
                                   + f"; logs in {self.dir / 'logs'}" + (f"; the controller's ends:\n{tail(controller.log)}"
                                                                         if controller is not None else ""))
            time.sleep(0.2)

    # -- talking to the controller -------------------------------------------------

    def _channel(self) -> grpc.Channel:
        """To the controller: over mutual TLS with the cluster's certificates when it has them."""
        info = self.info()
        if info.get("internal_tls"):
            return endpoints.internal_channel(info["controller"], tls_folder=info["internal_tls"])
        return endpoints.channel(info["controller"])

    def _stub(self) -> tuple[grpc.Channel, controller_pb2_grpc.ControllerStub]:
        channel = self._channel()
        return channel, controller_pb2_grpc.ControllerStub(channel)

    def status(self, rpc_timeout: float = 10.0, list_snapshots: bool = False) -> dict:
        """The controller's view; its "snapshots" list is up to a few seconds old unless `list_snapshots`."""
        channel, stub = self._stub()
        try:
            s = stub.Status(controller_pb2.StatusRequest(list_snapshots=list_snapshots), timeout=rpc_timeout)
        except grpc.RpcError as err:
            raise ClusterError(f"controller of {self.name!r} did not answer ({err.code().name}); "
                               f"`moectl resume --name {self.name}` restarts it") from None
        finally:
            channel.close()
        return {
            "name": s.name, "endpoint": s.endpoint, "epoch": s.epoch, "desired_workers": s.desired_workers,
            "min_replicas": s.min_replicas, "converged": s.converged, "last_error": s.last_error,
            "imbalance": round(s.imbalance, 4), "frontends": list(s.frontends), "controller": self.info()["controller"],
            "layer_imbalance": {layer: round(x, 4) for layer, x in sorted(s.layer_imbalance.items())},
            "step": s.step, "lowest_step": s.lowest_step, "trainers": list(s.trainers), "snapshot": s.snapshot,
            "restored": s.restored, "colocate": s.colocate, "colocated": None if s.colocated < 0 else round(s.colocated, 4),
            "internal_tls": self.info().get("internal_tls", ""),  # the certificates' folder: parts call over mTLS
            "supervised": self.backend == "ray" or self.supervised(),  # a controller that dies is started again
            "rollbacks": [{"layer": r.layer, "expert": r.expert, "snapshot_step": r.snapshot_step, "step": r.step,
                           "source": r.source} for r in s.rollbacks],
            "snapshots": [{"step": x.step, "path": x.path, "experts": x.experts, "bytes": x.bytes,
                           "trainer_state": x.trainer_state} for x in s.snapshots],
            "workers": [{"id": w.id, "address": w.address, "pid": w.pid, "state": w.state,
                         "experts": [[l, e] for l, e in zip(w.experts[::2], w.experts[1::2])], "load": w.load,
                         "device": w.device} for w in s.workers],
        }

    def _stream(self, call: str, request, timeout: float) -> Iterator[str]:
        """The controller's progress lines for `call`. A controller that dies mid-call and is started again
        (by its supervisor, or Ray) is asked again: every admin call is safe to repeat (`wire/retry.py`)."""
        channel, stub = self._stub()
        restarts = self.backend == "ray" or self.supervised()
        try:
            for line in retry.stream_again_on_unavailable(
                    lambda left: (p.message for p in getattr(stub, call)(request, timeout=left) if not p.done),
                    timeout=timeout, window_s=retry.CONTROLLER_BACK_S if restarts else 0.0,
                    on_retry=retry.asking_again):
                yield line
        except grpc.RpcError as err:
            raise ClusterError(f"{call.lower()} failed: {err.details() or err.code().name}") from None
        finally:
            channel.close()

    def scale(self, workers: int, timeout: float = 600.0) -> Iterator[str]:
        return self._stream("Scale", controller_pb2.ScaleRequest(workers=workers), timeout)

    def drain(self, worker_id: str, timeout: float = 600.0, replace: bool = False) -> Iterator[str]:
        """Moves a worker's experts away and stops it; with `replace` a new worker starts first and takes them."""
        return self._stream("Drain", controller_pb2.DrainRequest(worker=worker_id, replace=replace), timeout)

    def snapshot(self, directory: str | Path | None = None, timeout: float = 600.0) -> Iterator[str]:
        directory = str(Path(directory).resolve()) if directory else ""
        if directory:
            Path(directory).mkdir(parents=True, exist_ok=True)
        return self._stream("Snapshot", controller_pb2.SnapshotRequest(directory=directory), timeout)

    def restore(self, snapshot: str | Path | None = None, timeout: float = 600.0) -> Iterator[str]:
        """Rolls every expert back to SNAPSHOT (a step-NNNNNNNN folder, or the newest good one in a folder of
        them; default: the cluster's snapshot directory). Refused while a trainer is connected."""
        request = controller_pb2.RestoreRequest(snapshot=str(Path(snapshot).resolve()) if snapshot else "")
        return self._stream("Restore", request, timeout)

    def migrate(self, layer: int, expert: int, to: str, source: str = "", timeout: float = 600.0) -> Iterator[str]:
        request = controller_pb2.MigrateRequest(layer=layer, expert=expert, to_worker=to, from_worker=source)
        return self._stream("Migrate", request, timeout)

    # -- down ------------------------------------------------------------------

    def down(self, grace: float = 5.0, keep_logs: bool = False) -> list[ProcessRecord]:
        """Stops every process of the cluster and forgets it (but for its logs/, with keep_logs); returns those
        that were running."""
        info = self.info()
        running = [r for r in self.records() if alive(r)]
        controller = self.controller_record()
        if self.backend == "ray":
            return running + self._down_ray(info, grace)
        supervisor = self.supervisor_record()
        if supervisor is not None:
            (self.dir / SUPERVISOR_RECORD).unlink(missing_ok=True)  # first: its controller would start another
            stop(supervisor, grace)  # first: it would start the controller again
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
        for orphan in unrecorded(str(self.dir / "run"), set(), OUR_MODULES):
            running.append(orphan)  # started by one that died before recording it: nothing else would stop it
            stop(orphan, grace)
        if not keep_logs:
            shutil.rmtree(self.dir, ignore_errors=True)
            return running
        for path in self.dir.iterdir():  # all but the logs, which a failed start's error points to
            if path.name == "logs":
                continue
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        return running

    def _down_ray(self, info: dict, grace: float) -> list:
        """Shutdown through the controller, then its actor and any left by name; the Ray instance too if
        `up` started it. Returns the actors stopped (by name)."""
        from moecluster.backends import ray_cluster
        from moecluster.backends.ray_actuator import RayActuator

        stopped = []
        if "ray_address" in info:
            ray_cluster.connect(info["ray_address"])
            if ray_cluster.controller_address(self.name) is not None:
                stopped.append("controller")
            ray_cluster.stop_controller(self.name)  # first: it would replace what goes next
            actors = RayActuator(self.spec(), "", frontend_port=0, grace=grace)
            stopped += [h.id for h in actors.workers()]
            actors.stop_all()
        for record in self.records():  # the Ray instance `up` started, if any
            stop(record, max(grace, 30))
        shutil.rmtree(self.dir, ignore_errors=True)
        return stopped

