"""The Kubernetes backend's actuator: worker Pods the controller creates and deletes itself.

Not a StatefulSet: the controller decides which worker leaves (the one whose
experts are cheapest to move), as KubeRay does for Ray workers. A worker is a
Pod named `NAME-worker-N`; it serves once Ready, at its pod IP. What exists is
read back from the API server by label, which is all a restarted operator
needs. Every call here is a plain API request; nothing is cached.
"""

from __future__ import annotations

import logging
import time

from kubernetes import client
from kubernetes.client.rest import ApiException
from moecluster.backends import k8s_resources as r
from moecluster.controller.actuator import WorkerHandle

log = logging.getLogger(__name__)
FIELD_MANAGER = "moecluster-operator"


class WorkerPodFailed(RuntimeError):
    pass


class _TemplateChanged(Exception):
    """A worker pod still starting was made from a template the cluster no longer asks for."""


def _ready(pod) -> bool:
    conditions = pod.status.conditions or []
    return any(c.type == "Ready" and c.status == "True" for c in conditions)


def _gone(err: ApiException) -> bool:
    return err.status == 404


class KubernetesActuator:
    def __init__(self, resource: r.Resource, *, default_image: str, api: client.ApiClient | None = None,
                 poll: float = 0.25):
        self.resource = resource  # replaced by the operator when the resource changes
        self.default_image = default_image
        self.core = client.CoreV1Api(api)
        self.apps = client.AppsV1Api(api)
        self.poll = poll

    @property
    def namespace(self) -> str:
        return self.resource.namespace

    # -- workers -----------------------------------------------------------------

    def start_worker(self, worker_id: str, timeout: float) -> WorkerHandle:
        name = r.worker_pod_name(self.resource, worker_id)
        deadline = time.monotonic() + timeout
        while True:
            pod = self._read_pod(name)
            if pod is not None and pod.metadata.deletion_timestamp is not None:
                self._await_gone(name, deadline)  # a worker of the same id on its way out
                pod = None
            if pod is None:
                try:
                    self.core.create_namespaced_pod(self.namespace, r.worker_pod(self.resource, worker_id,
                                                                                 self.default_image),
                                                    field_manager=FIELD_MANAGER)
                except ApiException as err:
                    if err.status != 409:  # 409: created meanwhile (a retried step): wait for it below
                        raise
            try:
                return self._await_ready(worker_id, name, deadline)
            except _TemplateChanged as changed:  # e.g. an image that cannot be pulled, set back: start it anew
                log.info("%s: starting it again on the current template", changed)
                self._delete_pod(name)
            except (TimeoutError, WorkerPodFailed):
                self._delete_pod(name)
                raise

    def _await_ready(self, worker_id: str, name: str, deadline: float) -> WorkerHandle:
        while True:
            pod = self._read_pod(name)
            if pod is None:
                raise WorkerPodFailed(f"pod {self.namespace}/{name} was deleted while starting")
            if pod.status.phase in ("Failed", "Succeeded"):
                raise WorkerPodFailed(f"pod {self.namespace}/{name} ended ({pod.status.phase}): {pod.status.message or ''}")
            if pod.status.pod_ip and _ready(pod):
                return WorkerHandle(worker_id, f"{pod.status.pod_ip}:{r.WORKER_PORT}", 0)
            if self._outdated(pod):  # not serving yet, so nothing is lost by starting it again
                raise _TemplateChanged(f"pod {self.namespace}/{name} is not Ready and its worker template changed")
            if time.monotonic() > deadline:
                waiting = [c.state.waiting.reason for c in pod.status.container_statuses or [] if c.state.waiting]
                raise TimeoutError(f"pod {self.namespace}/{name} not Ready in time (phase {pod.status.phase}, "
                                   f"waiting: {waiting or 'none'})")
            time.sleep(self.poll)

    def stop_worker(self, worker_id: str) -> None:
        name = r.worker_pod_name(self.resource, worker_id)
        self._delete_pod(name)
        self._await_gone(name, time.monotonic() + 40, must=False)

    def workers(self) -> list[WorkerHandle]:
        handles = []
        for pod in self._worker_pods():
            worker_id = (pod.metadata.labels or {}).get(r.WORKER_LABEL, "")
            if pod.metadata.deletion_timestamp is not None:
                continue
            if worker_id and pod.status.pod_ip and pod.status.phase == "Running" and _ready(pod):
                handles.append(WorkerHandle(worker_id, f"{pod.status.pod_ip}:{r.WORKER_PORT}", 0))
            else:
                # Half-started by an operator that died, or ended: the controller starts a fresh one if needed.
                log.info("deleting worker pod %s/%s (phase %s, not ready)", self.namespace, pod.metadata.name,
                         pod.status.phase)
                self._delete_pod(pod.metadata.name)
        return sorted(handles, key=lambda h: h.id)

    def worker_templates(self) -> dict[str, str]:
        """Worker id -> the template its pod was made from ("" if it has none), for pods not on their way out."""
        return {(pod.metadata.labels or {}).get(r.WORKER_LABEL, pod.metadata.name):
                (pod.metadata.annotations or {}).get(r.TEMPLATE_ANNOTATION, "")
                for pod in self._worker_pods() if pod.metadata.deletion_timestamp is None}

    def worker_template(self) -> str:
        return r.worker_template(self.resource, self.default_image)

    def _outdated(self, pod) -> bool:
        try:
            current = self.worker_template()
        except ValueError:  # no image to start anything with: keep what there is
            return False
        return (pod.metadata.annotations or {}).get(r.TEMPLATE_ANNOTATION, "") != current

    def _worker_pods(self):
        return self.core.list_namespaced_pod(self.namespace, label_selector=r.worker_selector(self.resource)).items

    # -- frontend and services -----------------------------------------------------------

    def start_frontend(self, controller_address: str, timeout: float) -> WorkerHandle:
        """Applies the frontend Deployment and both Services (idempotent); the frontend Service's address."""
        self.apply_services()
        self._apply(self.apps.patch_namespaced_deployment,
                    r.frontend_deployment(self.resource, controller_address, self.default_image))
        service = self.core.read_namespaced_service(self.resource.name, self.namespace)
        port = service.spec.ports[0].port
        return WorkerHandle("frontend", f"{service.spec.cluster_ip}:{port}", 0)

    def frontend_alive(self) -> bool:
        return True  # its Deployment restarts a pod that died

    def apply_services(self) -> None:
        self._apply(self.core.patch_namespaced_service, r.workers_service(self.resource))
        self._apply(self.core.patch_namespaced_service, r.frontend_service(self.resource))

    def _apply(self, patch, manifest: dict) -> None:
        """Server-side apply: creates or updates to exactly this, as one field manager."""
        patch(manifest["metadata"]["name"], self.namespace, manifest, field_manager=FIELD_MANAGER, force=True,
              _content_type="application/apply-patch+yaml")

    def stop_all(self) -> None:
        for delete, name in ((self.apps.delete_namespaced_deployment, f"{self.resource.name}-frontend"),
                             (self.core.delete_namespaced_service, self.resource.name),
                             (self.core.delete_namespaced_service, f"{self.resource.name}-workers")):
            try:
                delete(name, self.namespace)
            except ApiException as err:
                if not _gone(err):
                    raise
        for pod in self._worker_pods():
            self._delete_pod(pod.metadata.name)

    # -- pods ---------------------------------------------------------------------

    def _read_pod(self, name: str):
        try:
            return self.core.read_namespaced_pod(name, self.namespace)
        except ApiException as err:
            if _gone(err):
                return None
            raise

    def _delete_pod(self, name: str) -> None:
        try:
            self.core.delete_namespaced_pod(name, self.namespace)
        except ApiException as err:
            if not _gone(err):
                raise

    def _await_gone(self, name: str, deadline: float, must: bool = True) -> None:
        while self._read_pod(name) is not None:
            if time.monotonic() > deadline:
                if must:
                    raise TimeoutError(f"pod {self.namespace}/{name} still terminating")
                log.warning("pod %s/%s still terminating; going on", self.namespace, name)
                return
            time.sleep(self.poll)
