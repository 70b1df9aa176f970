"""What the Kubernetes operator asks the API server for, as plain manifests: pure functions, no client.

A `MoECluster` becomes: one Pod per expert worker (`NAME-worker-N`, created and
deleted by the controller itself, so it picks which worker goes), a headless
Service over the workers, and a Deployment + Service for the frontends. Every
object carries an owner reference to the `MoECluster`, so deleting it deletes
them (the garbage collector does), and the labels below, so they can be found.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

from moecluster.backends.worker_rollout import Rollout
from moecluster.controller.spec import ClusterSpec, as_flags
from moecluster.wire import internal_tls

GROUP, VERSION, PLURAL, KIND = "moecluster.io", "v1alpha1", "moeclusters", "MoECluster"
WORKER_PORT, BULK_PORT, FRONTEND_PORT, METRICS_PORT = 50061, 50062, 50051, 9090
CLUSTER_LABEL, WORKER_LABEL = "moecluster.io/cluster", "moecluster.io/worker-id"
DRAIN_ANNOTATION = "moecluster.io/drain"  # value: a worker id; `kubectl moe drain` sets it
REPLACE_ANNOTATION = "moecluster.io/replace"  # value: a worker id; `kubectl moe replace` sets it
MIGRATE_ANNOTATION = "moecluster.io/migrate"  # value: LAYER:EXPERT=WORKER; `kubectl moe migrate` sets it
SNAPSHOT_ANNOTATION = "moecluster.io/snapshot"  # value: when it was asked; `kubectl moe snapshot` sets it
RESTORE_ANNOTATION = "moecluster.io/restore"  # value: a snapshot folder, or "latest"; `kubectl moe restore` sets it
REQUEST_ANNOTATION = "moecluster.io/request"  # value: an id `kubectl moe` makes; echoed in status.lastAction.request
TEMPLATE_ANNOTATION = "moecluster.io/worker-template"  # on a worker pod: the template it was made from
RUN_AS_USER = 10001  # the image's non-root user
API_KEYS_MOUNT, TLS_MOUNT = "/etc/moecluster/api-keys", "/etc/moecluster/tls"  # a frontend's Secrets, by default
INTERNAL_TLS_MOUNT = "/etc/moecluster/internal-tls"  # spec.internalTLS's Secret, in workers and frontends


@dataclass(frozen=True)
class Resource:
    """The parts of a `MoECluster` object the operator reads."""

    namespace: str
    name: str
    uid: str
    spec: dict[str, Any]
    generation: int = 1
    annotations: dict[str, str] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @classmethod
    def from_body(cls, body) -> "Resource":
        meta = body["metadata"]
        return cls(meta["namespace"], meta["name"], meta.get("uid", ""), dict(body.get("spec") or {}),
                   int(meta.get("generation") or 1), dict(meta.get("annotations") or {}))


def cluster_spec(resource: Resource) -> ClusterSpec:
    """The controller's spec for this resource (raises pydantic's ValidationError on a bad one)."""
    spec = resource.spec
    worker = spec.get("worker") or {}
    return ClusterSpec(
        name=re.sub(r"[^A-Za-z0-9_-]", "-", resource.name),
        model=spec["model"]["path"],
        workers=spec["replicas"],
        min_replicas=spec.get("minReplicasPerExpert", 1),
        standby_workers=spec.get("standbyWorkers", 0),
        max_replicas=spec.get("maxReplicasPerExpert"),
        worker_num_gpus=_gpus(worker),
        worker_device=pod_device(worker),
        frontend_device=pod_device(spec.get("frontend") or {}),
        snapshot_dir=snapshot_dir(resource),
        snapshot_every_s=(spec.get("snapshots") or {}).get("everySeconds"),
        snapshot_keep=(spec.get("snapshots") or {}).get("keep", 3),
        drained=tuple(spec.get("drained") or ()),
        colocate=bool(spec.get("colocate", False)),
        rebalance_above=spec.get("rebalanceAbove", 1.3),
        rebalance_min_load=spec.get("rebalanceMinLoad", 50.0),
        worker_batch_tokens=worker.get("batchTokens"),
        worker_compute_threads=worker.get("computeThreads"),
        generate_cache_tokens=(spec.get("frontend") or {}).get("generateCacheTokens"),
        forward_batch_tokens=(spec.get("frontend") or {}).get("forwardBatchTokens"),
        **_access_files(spec.get("frontend") or {}),
    )


def _access_files(frontend: dict) -> dict[str, str]:
    """Where a frontend reads its API keys and TLS files: the mounts of their Secrets (`_volumes`)."""
    files = {}
    if frontend.get("apiKeys"):
        keys = frontend["apiKeys"]
        files["api_keys_file"] = f"{keys.get('mountPath', API_KEYS_MOUNT)}/{keys.get('key', 'api-keys')}"
    if frontend.get("tls"):
        mount = frontend["tls"].get("mountPath", TLS_MOUNT)
        files |= {"tls_cert_file": f"{mount}/tls.crt", "tls_key_file": f"{mount}/tls.key"}
    return files


def snapshot_dir(resource: Resource) -> str | None:
    """Where worker pods mount the snapshot volume (None: the cluster keeps no snapshots)."""
    snapshots = resource.spec.get("snapshots")
    return snapshots.get("mountPath", "/snapshots") if snapshots else None


def pod_device(section: dict) -> str:
    """A worker's or frontend's device: the spec's; unset, the GPU the pod asks for, if it asks for one."""
    return section.get("device") or ("cuda" if _gpus(section) > 0 else "cpu")


def _gpus(worker: dict) -> float:
    resources = worker.get("resources") or {}
    return float({**(resources.get("limits") or {}), **(resources.get("requests") or {})}.get("nvidia.com/gpu", 0))


def labels(resource: Resource, component: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "moecluster",
        "app.kubernetes.io/instance": resource.name,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/managed-by": "moecluster-operator",
        CLUSTER_LABEL: resource.name,
    }


def worker_selector(resource: Resource) -> str:
    """The scale subresource's label selector: this cluster's worker pods."""
    return f"{CLUSTER_LABEL}={resource.name},app.kubernetes.io/component=worker"


def owner_reference(resource: Resource) -> dict:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "name": resource.name, "uid": resource.uid,
            "controller": True, "blockOwnerDeletion": True}


def worker_pod_name(resource: Resource, worker_id: str) -> str:
    return f"{resource.name}-{worker_id}"


def _meta(resource: Resource, name: str, component: str, extra_labels: dict | None = None) -> dict:
    return {"name": name, "namespace": resource.namespace, "labels": {**labels(resource, component), **(extra_labels or {})},
            "ownerReferences": [owner_reference(resource)]}


def _restricted_container() -> dict:
    """The `restricted` Pod Security profile, container part."""
    return {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]}}


def _pod_security() -> dict:
    return {"runAsNonRoot": True, "runAsUser": RUN_AS_USER, "runAsGroup": RUN_AS_USER, "fsGroup": RUN_AS_USER,
            "seccompProfile": {"type": "RuntimeDefault"}}


def _env(resource: Resource) -> list[dict]:
    internal = resource.spec.get("internalTLS")
    return [
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "HOME", "value": "/tmp"},  # read-only root: caches (torch, HF) go to the emptyDir
        *([{"name": internal_tls.ENV, "value": internal.get("mountPath", INTERNAL_TLS_MOUNT)}] if internal else []),
    ]


def _volumes(resource: Resource, worker: bool) -> tuple[list[dict], list[dict]]:
    """(volumes, mounts): a writable /tmp, the model's volume when it is not in the image, and on workers
    the snapshot volume (read-write: workers write and read the snapshots)."""
    volumes, mounts = [{"name": "tmp", "emptyDir": {}}], [{"name": "tmp", "mountPath": "/tmp"}]
    model = resource.spec["model"]
    if model.get("volume"):
        volumes.append({"name": "model", **model["volume"]})
        mounts.append({"name": "model", "mountPath": model.get("mountPath", "/models"), "readOnly": True})
    if worker and resource.spec.get("snapshots"):
        volumes.append({"name": "snapshots", **resource.spec["snapshots"]["volume"]})
        mounts.append({"name": "snapshots", "mountPath": snapshot_dir(resource)})
    frontend = resource.spec.get("frontend") or {}
    secrets = [("api-keys", frontend.get("apiKeys"), API_KEYS_MOUNT), ("tls", frontend.get("tls"), TLS_MOUNT)]
    for name, secret, default in [*([] if worker else secrets),
                                  ("internal-tls", resource.spec.get("internalTLS"), INTERNAL_TLS_MOUNT)]:
        if secret:  # a Secret volume: the kubelet refreshes it when the Secret changes
            volumes.append({"name": name, "secret": {"secretName": secret["secretName"]}})
            mounts.append({"name": name, "mountPath": secret.get("mountPath", default), "readOnly": True})
    return volumes, mounts


def _image(resource: Resource, default_image: str) -> str:
    image = resource.spec.get("image") or default_image
    if not image:
        raise ValueError("spec.image is empty and the operator has no --default-image")
    return image


def _pod_common(resource: Resource, part: dict, worker: bool) -> dict:
    volumes, _ = _volumes(resource, worker)
    common = {"securityContext": _pod_security(), "volumes": volumes, "enableServiceLinks": False,
              "automountServiceAccountToken": False}
    if resource.spec.get("imagePullSecrets"):
        common["imagePullSecrets"] = resource.spec["imagePullSecrets"]
    for key in ("nodeSelector", "tolerations"):
        if part.get(key):
            common[key] = part[key]
    return common


def _selector(resource: Resource, component: str) -> dict[str, str]:
    return {CLUSTER_LABEL: resource.name, "app.kubernetes.io/component": component}


def _container(resource: Resource, name: str, module: str, args: list[str], part: dict, default_image: str,
               ports: dict[str, int]) -> dict:
    """A worker's or frontend's container: the image's Python running `module`, ready once its gRPC health says so."""
    _, mounts = _volumes(resource, name == "worker")
    return {
        "name": name,
        "image": _image(resource, default_image),
        "imagePullPolicy": resource.spec.get("imagePullPolicy", "IfNotPresent"),
        "command": ["python", "-m", module],
        "args": args,
        "env": _env(resource),
        "ports": [{"name": port_name, "containerPort": port} for port_name, port in ports.items()],
        "readinessProbe": {**_probe(resource, name, ports["grpc"]), "periodSeconds": 2, "failureThreshold": 2},
        "resources": part.get("resources") or {},
        "securityContext": _restricted_container(),
        "volumeMounts": mounts,
    }


def _probe(resource: Resource, name: str, port: int) -> dict:
    """gRPC health, except on a port serving TLS (a frontend's with frontend.tls, a worker's with internalTLS):
    the kubelet's gRPC probe speaks plaintext only, so there a TCP connect (a frontend opens its port once it
    has the routing table, a worker once it serves)."""
    tls = (resource.spec.get("frontend") or {}).get("tls") if name == "frontend" else resource.spec.get("internalTLS")
    return {"tcpSocket": {"port": port}} if tls else {"grpc": {"port": port}}


def worker_pod(resource: Resource, worker_id: str, default_image: str) -> dict:
    """A worker holding no experts yet; the controller loads them once it serves.

    restartPolicy Never: a worker that died comes back empty anyway, so the
    controller replaces it with a new one (new id) and re-places its experts."""
    meta = _meta(resource, worker_pod_name(resource, worker_id), "worker", {WORKER_LABEL: worker_id})
    meta["annotations"] = {TEMPLATE_ANNOTATION: worker_template(resource, default_image)}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": _worker_spec(resource, worker_id, default_image)}


def worker_template(resource: Resource, default_image: str) -> str:
    """A hash of what every worker pod runs (image, flags, resources, volumes), whatever its id: a pod made
    from another one is outdated, and the operator rolls it (`worker_rollout.py`)."""
    spec = json.dumps(_worker_spec(resource, "", default_image), sort_keys=True)
    return hashlib.sha256(spec.encode()).hexdigest()[:16]


def _worker_spec(resource: Resource, worker_id: str, default_image: str) -> dict:
    worker = resource.spec.get("worker") or {}
    args = ["--checkpoint", resource.spec["model"]["path"], "--experts", "", "--worker-id", worker_id,
            "--host", "$(POD_IP)", "--port", str(WORKER_PORT), "--bulk-port", str(BULK_PORT),
            "--metrics-port", str(METRICS_PORT), "--threads", str(worker.get("threads", 0)),
            "--dtype", worker.get("dtype", "float32"), "--device", pod_device(worker), "--grace", "5",
            *as_flags(cluster_spec(resource).worker_settings())]
    container = _container(resource, "worker", "moecluster.workers.server", args, worker, default_image,
                           {"grpc": WORKER_PORT, "bulk": BULK_PORT, "metrics": METRICS_PORT})
    return {**_pod_common(resource, worker, worker=True), "containers": [container], "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 30}


def workers_service(resource: Resource) -> dict:
    """Headless: stable DNS names for the workers (and a selector for monitoring), no load balancing."""
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": _meta(resource, f"{resource.name}-workers", "worker"),
        "spec": {"clusterIP": "None", "publishNotReadyAddresses": True,
                 "selector": _selector(resource, "worker"),
                 "ports": [{"name": "grpc", "port": WORKER_PORT, "targetPort": "grpc"},
                           {"name": "bulk", "port": BULK_PORT, "targetPort": "bulk"}]},
    }


def frontend_deployment(resource: Resource, controller_address: str, default_image: str) -> dict:
    frontend, spec = resource.spec.get("frontend") or {}, cluster_spec(resource)
    args = ["--checkpoint", resource.spec["model"]["path"], "--controller", controller_address,
            # 127.0.0.1 too: `kubectl port-forward` connects to the pod's loopback.
            "--cluster", resource.key, "--frontend-id", "$(POD_NAME)", "--host", "$(POD_IP),127.0.0.1",
            "--port", str(FRONTEND_PORT), "--metrics-port", str(METRICS_PORT), "--device", pod_device(frontend),
            *as_flags({**spec.frontend_settings(), **spec.frontend_access()})]
    container = _container(resource, "frontend", "moecluster.frontend.server", args, frontend, default_image,
                           {"grpc": FRONTEND_PORT, "metrics": METRICS_PORT})
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": _meta(resource, f"{resource.name}-frontend", "frontend"),
        "spec": {
            "replicas": frontend.get("replicas", 1),
            "selector": {"matchLabels": _selector(resource, "frontend")},
            # A new frontend serves before an old one goes: no request meets an empty Service.
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {
                "metadata": {"labels": labels(resource, "frontend")},
                "spec": {**_pod_common(resource, frontend, worker=False), "containers": [container],
                         "terminationGracePeriodSeconds": 30},
            },
        },
    }


def frontend_service(resource: Resource) -> dict:
    service = resource.spec.get("service") or {}
    metadata = _meta(resource, resource.name, "frontend")
    if service.get("annotations"):
        metadata["annotations"] = dict(service["annotations"])
    return {
        "apiVersion": "v1", "kind": "Service", "metadata": metadata,
        "spec": {"type": service.get("type", "ClusterIP"),
                 "selector": _selector(resource, "frontend"),
                 "ports": [{"name": "grpc", "port": service.get("port", FRONTEND_PORT), "targetPort": "grpc"}]},
    }


# -- status ------------------------------------------------------------------------------


def condition(kind: str, ok: bool, reason: str, message: str, generation: int, previous: list[dict], now: str) -> dict:
    """A condition, keeping lastTransitionTime when its status did not change."""
    status = "True" if ok else "False"
    before = next((c for c in previous if c.get("type") == kind), None)
    since = before["lastTransitionTime"] if before and before.get("status") == status and before.get(
        "lastTransitionTime") else now
    return {"type": kind, "status": status, "reason": reason, "message": message[:1000],
            "lastTransitionTime": since, "observedGeneration": generation}


def placement_summary(status: dict) -> str:
    experts = {tuple(e) for w in status["workers"] for e in w["experts"]}
    copies = sum(len(w["experts"]) for w in status["workers"])
    holding = sum(1 for w in status["workers"] if w["experts"])  # a leaving worker's copies count with it
    colocated = status.get("colocated")
    return (f"{len(experts)} experts, {copies} copies on {holding} workers, imbalance {status['imbalance']:.2f}"
            + (f", {colocated:.0%} of pairs co-located" if colocated is not None else "")
            if experts else "no experts placed yet")


def status_patch(resource: Resource, status: dict | None, pods: int, previous: dict, now: str, error: str = "",
                 rollout: Rollout | None = None) -> dict:
    """The `status` of the resource from the controller's `status()` (None: not started yet), its pod count
    and, once its pods are listed, where they stand against the worker template."""
    patch = _status(resource, status, pods, previous, now, error)
    if rollout is not None:
        updated = set(rollout.updated)
        patch["updatedReplicas"] = rollout.updated_replicas
        for w in patch.get("workers", []):
            w["updated"] = w["id"] in updated
        patch["conditions"].append(condition(
            "Updating", bool(rollout.outdated), "Outdated" if rollout.outdated else "UpToDate", rollout.message,
            resource.generation, list(previous.get("conditions") or []), now))
    return patch


def _status(resource: Resource, status: dict | None, pods: int, previous: dict, now: str, error: str) -> dict:
    old = list(previous.get("conditions") or [])
    port = (resource.spec.get("service") or {}).get("port", FRONTEND_PORT)
    base = {"replicas": pods, "labelSelector": worker_selector(resource), "observedGeneration": resource.generation,
            "endpoint": f"{resource.name}.{resource.namespace}.svc:{port}"}
    gen = resource.generation
    if status is None:
        return {**base, "readyReplicas": 0, "epoch": 0, "placement": "starting",
                "conditions": [condition("Ready", False, "Starting", error or "the controller is starting", gen, old, now),
                               condition("Scaling", True, "Starting", "creating the first worker", gen, old, now),
                               condition("Degraded", bool(error), "Error" if error else "None", error, gen, old, now)]}
    serving = [w for w in status["workers"] if w["state"] == "serving"]
    base["replicas"] = max(0, pods - sum(1 for w in status["workers"] if w["state"] == "standby"))  # the scale's view
    dead = status["dead"]
    desired = status["desired_workers"]
    ready = status["converged"] and len(serving) == desired
    scaling = not status["converged"] or len(serving) != desired
    problem = status["last_error"] or (f"dead workers: {', '.join(dead)}" if dead else "")
    starting = [w["id"] for w in status["workers"] if w["state"] == "starting"]  # a pod with no room stays here
    scaling_message = (f"{len(serving)}/{desired} workers serving" + (f"; starting {', '.join(starting)}" if starting
                                                                      else "")) if scaling else ""
    return {
        **base, "readyReplicas": len(serving), "epoch": status["epoch"], "placement": placement_summary(status),
        "workers": [{"id": w["id"], "pod": worker_pod_name(resource, w["id"]), "state": w["state"],
                     "experts": len(w["experts"]), "device": w.get("device", "")} for w in status["workers"]],
        "training": {"step": status["step"], "lowestStep": status["lowest_step"], "trainers": len(status["trainers"]),
                     "lastSnapshot": status["snapshot"], "restored": status["restored"], "rollbacks": status["rollbacks"],
                     "snapshots": [{"step": x["step"], "path": x["path"], "experts": x["experts"], "bytes": x["bytes"],
                                    "trainerState": x["trainer_state"]} for x in status["snapshots"]]},
        "conditions": [
            condition("Ready", ready, "Serving" if ready else "Converging",
                      f"{len(serving)} workers serving at epoch {status['epoch']}", gen, old, now),
            condition("Scaling", scaling, "Scaling" if scaling else "Stable", scaling_message, gen, old, now),
            condition("Degraded", bool(problem), "Error" if problem else "None", problem, gen, old, now),
        ],
    }


# -- requests made through annotations ---------------------------------------------------------


def parse_migrate(value: str) -> tuple[tuple[int, int], str]:
    """`LAYER:EXPERT=WORKER` -> ((layer, expert), worker)."""
    match = re.fullmatch(r"\s*(\d+):(\d+)\s*=\s*([A-Za-z0-9_.-]+)\s*", value)
    if not match:
        raise ValueError(f"{MIGRATE_ANNOTATION}={value!r}: expected LAYER:EXPERT=WORKER, e.g. 0:3=worker-2")
    return (int(match[1]), int(match[2])), match[3]
