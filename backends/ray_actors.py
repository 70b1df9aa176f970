"""The Ray backend's actors: expert workers and the controller, each running the same gRPC
server the local backend runs as a process (the frontend is a Serve application: `ray_serve.py`).

An actor is a process Ray placed (on a GPU where the spec asks for one); it
serves on its node's address and reports that address and its pid, so the
controller watches it exactly as it watches a local worker: health stream,
heartbeats, kill -9 detected in well under a second. Actors are detached and
named `NAME/worker-N` in the `moecluster` namespace, so a restarted controller
finds them again by name (`RayActuator.workers`).
"""

from __future__ import annotations

import os
import tempfile
import threading
from pathlib import Path

import ray
from moecluster.wire import endpoints, internal_tls

NAMESPACE = "moecluster"
PORT_TAKEN = "controller: cannot listen on"  # how a controller actor says its port is taken (ray_cluster reads it)


def node_host() -> str:
    """The address other nodes reach this one at (127.0.0.1 on a single-machine instance)."""
    return ray.util.get_node_ip_address()


@ray.remote(max_restarts=0)
class WorkerActor:
    """One expert worker: `moecluster.workers.server.WorkerServer` on this node."""

    def __init__(self, index_json: str, worker_id: str, threads: int, device: str = "cpu",
                 settings: dict[str, int] | None = None, tls: dict[str, str] | None = None):
        """`settings`: the spec's serving keywords for WorkerServer (ClusterSpec.worker_settings); `tls`: the
        cluster's certificates (internal_tls.pems), for mutual TLS with the other parts."""
        import torch
        from moecluster.models.checkpoint import Checkpoint
        from moecluster.workers.server import WorkerServer

        os.environ.pop(internal_tls.ENV, None)  # the cluster's certificates or none, not what Ray's process inherited
        if tls:
            internal_tls.install(tls)
        if threads:
            torch.set_num_threads(threads)
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            f.write(index_json)  # the controller's checkpoint index: no transformers import here
        self.server = WorkerServer(Checkpoint.from_index(f.name), [], host=node_host(), worker_id=worker_id,
                                   device=device, **(settings or {})).start()
        os.unlink(f.name)

    def info(self) -> tuple[str, int]:
        return self.server.address, os.getpid()

    def stop(self, grace: float) -> None:
        self.server.stop(grace)


@ray.remote(max_restarts=-1)  # a crashed controller is started again by Ray, at the same address, from the workers
class ControllerActor:
    """The controller core with a RayActuator, serving `moecluster.controller.v1` on this node.

    Started pinned to the node `moectl up` ran on, so the cluster folder (spec.json) is local to it.
    Killed and started again, it finds its workers by their actor names and carries on."""

    def __init__(self, cluster_dir: str):
        from moecluster.backends import cluster_record
        from moecluster.backends.ray_actuator import RayActuator
        from moecluster.controller.runtime import Controller
        from moecluster.controller.service import ControllerService
        from moecluster.controller.spec import ClusterSpec
        from moecluster.models.checkpoint import Checkpoint
        from moecluster.protos import controller_pb2_grpc

        directory = Path(cluster_dir)
        spec_path = directory / "spec.json"
        spec = ClusterSpec.model_validate_json(spec_path.read_text())
        cluster = cluster_record.read(directory)
        os.environ.pop(internal_tls.ENV, None)
        if cluster.get("internal_tls"):  # pinned to the node of the cluster folder, which holds them
            os.environ[internal_tls.ENV] = cluster["internal_tls"]
        index = directory / "index.json"
        geometry = Checkpoint.indexed(spec.model, index).geometry  # a restarted actor reads it back, without transformers
        experts = tuple((layer, e) for layer in geometry.moe_layers for e in range(geometry.num_experts))
        actuator = RayActuator(spec, index.read_text(), frontend_port=cluster["frontend_port"],
                               worker_threads=cluster.get("worker_threads", 1),
                               tls=internal_tls.pems(Path(cluster["internal_tls"])) if cluster.get("internal_tls") else None)

        def save_spec(new: ClusterSpec) -> None:
            tmp = spec_path.with_suffix(".tmp")
            tmp.write_text(new.model_dump_json(indent=2))
            tmp.replace(spec_path)

        self.server = endpoints.server(16)
        # The port `up` chose, on every restart: frontends reconnect to the address they know.
        port = int(cluster["controller"].rsplit(":", 1)[1])
        try:
            bound = endpoints.listen(self.server, f"{node_host()}:{port}")
        except RuntimeError:  # newer gRPC raises where older returned 0
            bound = 0
        if bound == 0:
            raise OSError(f"{PORT_TAKEN} {node_host()}:{port}")
        self.address = f"{node_host()}:{port}"
        self.controller = Controller(spec, actuator, experts, address=self.address, save_spec=save_spec)
        self.stopped = threading.Event()
        controller_pb2_grpc.add_ControllerServicer_to_server(
            ControllerService(self.controller, on_shutdown=lambda: (self.controller.shutdown(), self.stopped.set())),
            self.server)
        self.controller.start()  # state rebuilt from the workers before any request is taken
        self.server.start()

    def info(self) -> tuple[str, int]:
        return self.address, os.getpid()

    def stop(self) -> None:
        self.controller.stop()  # workers and frontend keep serving
        self.server.stop(2).wait()
