"""The Ray backend's actuator: workers as detached, named Ray actors; the frontend a Serve application.

Scaling asks Ray for actors with the spec's resources (`worker_num_cpus`,
`worker_num_gpus`, custom `worker_resources`); on an autoscaling Ray cluster
(KubeRay) a request no node can hold brings a new node. What it started is
found again by name (`NAME/worker-N` in the `moecluster` namespace), which is
all a restarted controller needs. Nothing outside `backends/ray_*` imports ray.
"""

from __future__ import annotations

import logging

import ray
from moecluster.backends import ray_serve
from moecluster.backends.ray_actors import NAMESPACE, WorkerActor
from moecluster.controller.actuator import WorkerHandle
from moecluster.controller.spec import ClusterSpec
from ray.exceptions import GetTimeoutError, RayActorError

log = logging.getLogger(__name__)
ACTOR_ERRORS = (RayActorError, GetTimeoutError, ValueError)


class RayActuator:
    def __init__(self, spec: ClusterSpec, index_json: str, *, frontend_port: int, worker_threads: int = 1,
                 grace: float = 5.0, tls: dict[str, str] | None = None):
        """`tls`: the cluster's certificates (internal_tls.pems), handed to every worker actor and Serve replica."""
        if spec.frontend_access():
            raise ValueError("API keys and TLS are the local and Kubernetes frontends'; on Ray, clients reach the "
                             "frontends through Serve's proxies: set TLS on those, and keep them inside the cluster")
        self.name = spec.name
        self.model = spec.model
        self.index_json = index_json  # workers read the checkpoint through it, without importing transformers
        self.frontend_port = frontend_port
        self.worker_threads = worker_threads
        self.grace = grace
        self.tls = tls
        self.serve_grpc_port = spec.serve_grpc_port
        self.worker_device, self.frontend_device = spec.worker_device, spec.frontend_device
        self.worker_settings, self.frontend_settings = spec.worker_settings(), spec.frontend_settings()
        self.resources = {"num_cpus": spec.worker_num_cpus, "num_gpus": spec.worker_num_gpus,
                          "resources": dict(spec.worker_resources)}

    def _actor(self, role: str):
        try:
            return ray.get_actor(f"{self.name}/{role}", namespace=NAMESPACE)
        except ValueError:
            return None

    def _running(self, role: str, timeout: float) -> WorkerHandle | None:
        """The handle of a live actor of that role; a dead or half-started one is killed."""
        actor = self._actor(role)
        if actor is None:
            return None
        try:
            address, pid = ray.get(actor.info.remote(), timeout=timeout)
            return WorkerHandle(role, address, pid)
        except ACTOR_ERRORS as err:
            log.warning("actor %s/%s does not answer (%s); replacing it", self.name, role, type(err).__name__)
            ray.kill(actor)
            return None

    def start_worker(self, worker_id: str, timeout: float) -> WorkerHandle:
        handle = self._running(worker_id, min(timeout, 10.0))
        if handle is not None:
            return handle
        actor = WorkerActor.options(name=f"{self.name}/{worker_id}", namespace=NAMESPACE, lifetime="detached",
                                    **self.resources).remote(self.index_json, worker_id, self.worker_threads,
                                                             self.worker_device, self.worker_settings, self.tls)
        try:
            address, pid = ray.get(actor.info.remote(), timeout=timeout)
        except ACTOR_ERRORS:
            ray.kill(actor)
            raise
        return WorkerHandle(worker_id, address, pid)

    def stop_worker(self, worker_id: str) -> None:
        self._stop(worker_id)

    def _stop(self, role: str) -> None:
        actor = self._actor(role)
        if actor is None:
            return
        try:
            ray.get(actor.stop.remote(self.grace), timeout=self.grace + 5)
        except ACTOR_ERRORS:
            pass  # dead already, or hung: killed below either way
        ray.kill(actor)

    def workers(self) -> list[WorkerHandle]:
        prefix = f"{self.name}/worker-"
        names = sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                       if a["namespace"] == NAMESPACE and a["name"].startswith(prefix))
        handles = [self._running(name.split("/", 1)[1], 10.0) for name in names]
        return [h for h in handles if h is not None]

    def start_frontend(self, controller_address: str, timeout: float) -> WorkerHandle:
        """The Serve application (idempotent: serve.run updates it in place); its HTTP address."""
        url = ray_serve.start(self.name, self.model, controller_address, http_port=self.frontend_port,
                              grpc_port=self.serve_grpc_port, device=self.frontend_device,
                              settings=self.frontend_settings, tls=self.tls)
        return WorkerHandle("frontend", url, 0)

    def frontend_alive(self) -> bool:
        return True  # Serve restarts a replica that died

    def stop_all(self) -> None:
        try:
            ray_serve.stop(self.name)
        except Exception as err:  # noqa: BLE001 - Serve not running, or the app gone: nothing to stop
            log.info("no Serve application %s to stop (%s)", self.name, err)
        for handle in self.workers():
            self._stop(handle.id)
