"""The Kubernetes operator: one controller core per `MoECluster`, run inside a kopf operator.

    moecluster-operator --controller-address moecluster.moecluster-system.svc:50055 --default-image IMAGE

For each `MoECluster` it runs the same `Controller` the local and Ray backends
run, with a `KubernetesActuator`: the controller creates and deletes worker Pods
itself and applies the frontend Deployment and Services. The controllers'
gRPC API is served on one port (`--controller-port`) for all clusters; a
frontend names its cluster in the call metadata (`controller/router.py`).

Level-triggered: a timer on every resource compares it with what runs (spec,
requested drains and migrations), replaces worker pods made from an outdated
template a few at a time (`worker_rollout.py`), and writes `status` from what
the controller observes. Nothing is remembered in the operator that is not in
the API server or in the workers, so a restarted operator picks up where it
was, mid-scale included. One operator runs at a time: the chart deploys it as a
single replica with the Recreate strategy, and kopf runs standalone (no peering).
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import logging
import os
import threading

import grpc
import kopf
from kubernetes import config as kube_config
from moecluster.backends import k8s_resources as r
from moecluster.backends import worker_rollout
from moecluster.backends.k8s_actuator import KubernetesActuator
from moecluster.controller.metrics import ControllerMetrics, Sample, exposition
from moecluster.controller.router import ControllerRouter
from moecluster.controller.runtime import Controller
from moecluster.controller.service import ControllerService
from moecluster.observability.prometheus import rendered, serve_metrics
from moecluster.observability.rpc_latency import RpcLatency
from moecluster.protos import worker_pb2, worker_pb2_grpc
from moecluster.wire import endpoints, internal_tls
from pydantic import ValidationError

log = logging.getLogger("moecluster.operator")
FIRST_WORKER = "worker-0"
START_TIMEOUT_S = 600.0  # a worker pod's time to serve: pulling a multi-GB image onto a new node takes minutes


class Settings:
    controller_address = os.environ.get("MOECLUSTER_CONTROLLER_ADDRESS", "")
    default_image = os.environ.get("MOECLUSTER_DEFAULT_IMAGE", "")
    status_interval = 2.0


SETTINGS = Settings()
ROUTER = ControllerRouter()
RUNNERS: dict[str, ClusterRunner] = {}
RUNNERS_LOCK = threading.Lock()


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def checkpoint_experts(address: str) -> tuple[tuple[int, int], ...]:
    """Every (layer, expert) of the checkpoint, asked of a worker (the operator does not mount the model)."""
    with endpoints.internal_channel(address) as channel:
        stats = worker_pb2_grpc.ExpertWorkerStub(channel).Stats(worker_pb2.StatsRequest(), timeout=30)
    if not stats.moe_layers or not stats.num_experts:
        raise RuntimeError(f"worker at {address} reports no MoE layers: is the model a Mixture-of-Experts checkpoint?")
    return tuple((layer, e) for layer in stats.moe_layers for e in range(stats.num_experts))


class ClusterRunner:
    """One `MoECluster`'s controller: started in the background (its first worker takes a while), synced each tick."""

    def __init__(self, resource: r.Resource):
        self.resource = resource
        self.actuator = KubernetesActuator(resource, default_image=SETTINGS.default_image)
        self.controller: Controller | None = None
        self.error = ""
        self.action: dict = {}  # the last request made through an annotation, for status.lastAction
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._boot, name=f"boot-{resource.key}", daemon=True)

    def start(self) -> "ClusterRunner":
        self._thread.start()
        return self

    def _boot(self) -> None:
        delay = 1.0
        while not self._stopped.is_set():
            try:
                spec = r.cluster_spec(self.resource)
                self.actuator.apply_services()
                handles = self.actuator.workers()
                if not handles:
                    handles = [self.actuator.start_worker(FIRST_WORKER, START_TIMEOUT_S)]
                experts = checkpoint_experts(handles[0].address)
                if self._stopped.is_set():  # deleted while its first worker started
                    return
                controller = Controller(spec, self.actuator, experts, address=SETTINGS.controller_address,
                                        start_timeout=START_TIMEOUT_S)
                self.controller = controller.start()  # state rebuilt from the workers before any request is taken
                ROUTER.register(self.resource.key, ControllerService(controller))
                self.error = ""
                log.info("%s: controller started with %d workers, %d experts", self.resource.key, len(handles), len(experts))
                return
            except Exception as err:  # noqa: BLE001 - keep trying: the API server or the first pod may come back
                self.error = f"{type(err).__name__}: {err}"
                log.warning("%s: start failed (%s); retrying in %.0fs", self.resource.key, self.error, delay)
                self._stopped.wait(delay)
                delay = min(delay * 2, 30.0)

    def sync(self, resource: r.Resource) -> r.Resource:
        """Makes the controller want what the resource says (a no-op when it already does). Returns the resource it
        keeps: this one, or a newer spec a handler took meanwhile (a tick's body can be older: kopf runs timers and
        change handlers side by side), so that nothing goes back to an older spec."""
        with self._lock:
            if resource.generation < self.resource.generation:
                resource = self.resource
            self.resource = self.actuator.resource = resource
        if self.controller is None:
            return resource
        spec = r.cluster_spec(resource)
        if spec != self.controller.spec:
            log.info("%s: spec changed: %d workers, %d copies per expert", resource.key, spec.workers, spec.min_replicas)
            self.controller.update_spec(spec)
        if self.controller.frontend is not None:  # re-applied each tick: a deleted Deployment or Service comes back
            self.controller.frontend = self.actuator.start_frontend(SETTINGS.controller_address, timeout=60)
        return resource

    def run_action(self, what: str, steps, request: str = "") -> None:
        """Runs a request (drain, migrate, snapshot, restore) in the background; its outcome goes to status.lastAction,
        with the id of the request (`kubectl moe` waits for its own, not an earlier one of the same name)."""
        self.action = {"action": what, "state": "Running", "message": "", "time": _now(), "request": request}

        def go():
            try:
                last = ""
                for line in steps():
                    if isinstance(line, str):  # a snapshot or restore ends with the Snapshot itself
                        last = line
                        log.info("%s: %s: %s", self.resource.key, what, line)
                self.action = {**self.action, "state": "Succeeded", "message": last, "time": _now()}
            except Exception as err:  # noqa: BLE001 - reported in status and as an Event, not raised in a thread
                self.action = {**self.action, "state": "Failed", "message": f"{type(err).__name__}: {err}", "time": _now()}

        threading.Thread(target=go, name=f"action-{self.resource.key}", daemon=True).start()

    def stop(self) -> None:
        """Stops the controller only: workers and frontends keep serving (an operator restart)."""
        self._stopped.set()
        ROUTER.unregister(self.resource.key)
        if self.controller is not None:
            self.controller.stop()

    def delete(self) -> None:
        self.stop()
        self.actuator.stop_all()


def _runner(resource: r.Resource) -> ClusterRunner:
    with RUNNERS_LOCK:
        runner = RUNNERS.get(resource.key)
        if runner is None or runner.resource.uid != resource.uid:  # a new object of the same name
            if runner is not None:
                runner.stop()
            runner = RUNNERS[resource.key] = ClusterRunner(resource).start()
        return runner


# -- kopf handlers -------------------------------------------------------------------------


@kopf.on.startup()
def _configure(settings: kopf.OperatorSettings, **_) -> None:
    settings.persistence.finalizer = "moecluster.io/finalizer"
    settings.posting.level = logging.INFO
    settings.watching.server_timeout = 60  # re-list now and then: level-triggered even if a watch silently stalls
    settings.watching.client_timeout = 90
    settings.networking.request_timeout = 30


def _checked(resource: r.Resource) -> None:
    """Raises (ValueError, ValidationError) what makes the resource impossible to run. Its mutual TLS must be
    this operator's: the one controller port serves every cluster's frontends, with the certificates it holds."""
    r.cluster_spec(resource)
    if resource.spec.get("internalTLS") and internal_tls.folder() is None:
        raise ValueError(f"spec.internalTLS is set, but this operator holds no certificates to call its workers with "
                         f"(the chart's operator.internalTLS.secretName sets {internal_tls.ENV})")
    if not resource.spec.get("internalTLS") and internal_tls.folder() is not None:
        raise ValueError("this operator calls its clusters over mutual TLS (operator.internalTLS): set spec.internalTLS "
                         "to a Secret of ca.crt, tls.crt and tls.key issued by the same CA")


def _validated(body) -> r.Resource:
    resource = r.Resource.from_body(body)
    try:
        _checked(resource)
    except (ValidationError, KeyError, ValueError) as err:
        raise kopf.PermanentError(f"invalid spec: {err}") from None
    return resource


@kopf.on.resume(r.GROUP, r.VERSION, r.PLURAL)
@kopf.on.create(r.GROUP, r.VERSION, r.PLURAL)
def _created(body, **_) -> None:
    _runner(_validated(body))


@kopf.on.update(r.GROUP, r.VERSION, r.PLURAL, field="spec")
def _spec_changed(body, **_) -> None:
    _runner(_validated(body)).sync(r.Resource.from_body(body))


@kopf.on.delete(r.GROUP, r.VERSION, r.PLURAL)
def _deleted(body, **_) -> None:
    resource = r.Resource.from_body(body)
    with RUNNERS_LOCK:
        runner = RUNNERS.pop(resource.key, None)
    if runner is not None:
        runner.delete()
    else:
        KubernetesActuator(resource, default_image=SETTINGS.default_image).stop_all()


@kopf.timer(r.GROUP, r.VERSION, r.PLURAL, interval=Settings.status_interval, initial_delay=1.0)
def _tick(body, status, patch, **_) -> None:
    """Level-triggered: bring the controller in line with the resource; write what it observes to status."""
    resource = r.Resource.from_body(body)
    try:
        _checked(resource)
    except (ValidationError, KeyError, ValueError) as err:
        patch.status.update(r.status_patch(resource, None, 0, dict(status), _now(), f"invalid spec: {err}"))
        return
    runner = _runner(resource)
    resource = runner.sync(resource)
    _take_requests(runner, resource, body, patch)
    controller = runner.controller
    before = dict(status)
    observed = controller.status() if controller else None
    templates = runner.actuator.worker_templates()
    rollout = _roll_workers(runner, resource, body, patch, observed, templates)
    new = r.status_patch(resource, observed, len(templates), before, _now(), runner.error, rollout)
    if runner.action:
        new["lastAction"] = runner.action
    _post_events(body, before, new)
    patch.status.update(new)


def _take_requests(runner: ClusterRunner, resource: r.Resource, body, patch) -> None:
    """Drain, replace, migrate, snapshot and restore, asked through annotations (`kubectl moe VERB`); each is taken once,
    then removed."""
    controller = runner.controller
    if controller is None:
        return
    request = resource.annotations.get(r.REQUEST_ANNOTATION, "")
    if request:
        patch.metadata.annotations[r.REQUEST_ANNOTATION] = None
    for annotation, verb in ((r.DRAIN_ANNOTATION, "drain"), (r.REPLACE_ANNOTATION, "replace")):
        worker = resource.annotations.get(annotation)
        if not worker:
            continue
        patch.metadata.annotations[annotation] = None
        try:
            steps = controller.drain(worker, replace=verb == "replace")
            first = next(steps)  # checks and starts the drain; the rest waits for it
        except ValueError as err:
            kopf.warn(body, reason=f"{verb.capitalize()}Refused", message=str(err))
            runner.action = {"action": f"{verb} {worker}", "state": "Failed", "message": str(err), "time": _now(),
                             "request": request}
            continue
        # The resource says what the pool now is, and whom it drains: a restarted operator goes on with it.
        patch.spec["replicas"] = controller.spec.workers
        patch.spec["drained"] = list(controller.spec.drained)
        kopf.info(body, reason="Draining", message=first)
        runner.run_action(f"{verb} {worker}", lambda first=first, steps=steps: itertools.chain([first], steps),
                          request)  # "has left" may be all
    migrate = resource.annotations.get(r.MIGRATE_ANNOTATION)
    if migrate:
        patch.metadata.annotations[r.MIGRATE_ANNOTATION] = None
        try:
            expert, to = r.parse_migrate(migrate)
        except ValueError as err:
            kopf.warn(body, reason="MigrateRefused", message=str(err))
            return
        kopf.info(body, reason="Migrating", message=f"moving expert {expert} to {to}")
        runner.run_action(f"migrate {migrate}", lambda: controller.migrate(expert, to), request)
    if resource.annotations.get(r.SNAPSHOT_ANNOTATION):
        patch.metadata.annotations[r.SNAPSHOT_ANNOTATION] = None
        kopf.info(body, reason="Snapshotting", message="writing every expert's training state at a step boundary")
        runner.run_action("snapshot", controller.snapshot, request)
    restore = resource.annotations.get(r.RESTORE_ANNOTATION)
    if restore:
        patch.metadata.annotations[r.RESTORE_ANNOTATION] = None
        kopf.info(body, reason="Restoring", message=f"rolling every expert back to {restore}")
        runner.run_action(f"restore {restore}", lambda: controller.restore("" if restore == "latest" else restore),
                          request)


def _roll_workers(runner: ClusterRunner, resource: r.Resource, body, patch, observed: dict | None,
                  templates: dict[str, str]) -> worker_rollout.Rollout:
    """Replaces the next workers (maxSurge) whose pods run an outdated template, if the cluster is at rest
    (see `worker_rollout.py`). A replace is a drain named in the spec, as `kubectl moe replace` makes: the
    controller carries it out, and the next ticks wait for it to end."""
    busy = runner.action["action"] if runner.action.get("state") == "Running" else ""
    strategy = resource.spec.get("updateStrategy") or {}
    try:
        template = r.worker_template(resource, runner.actuator.default_image)  # the strategy's spec, not a newer one
    except ValueError as err:  # no image: nothing can start, so nothing is replaced
        return worker_rollout.Rollout((), tuple(templates), 0, waiting=str(err))
    rollout = worker_rollout.plan(templates, template, observed, strategy.get("type", worker_rollout.ROLLING_UPDATE),
                                  busy, (strategy.get("rollingUpdate") or {}).get("maxSurge", 1))
    if not rollout.replace or runner.controller is None:
        return rollout
    for worker in rollout.replace:
        try:
            first = next(runner.controller.drain(worker, replace=True))
        except ValueError as err:  # it left meanwhile: the next tick plans again
            log.info("%s: not replacing %s now: %s", resource.key, worker, err)
            continue
        kopf.info(body, reason="Updating", message=f"{first}: its pod runs an outdated template ({rollout.message})")
    patch.spec["replicas"] = runner.controller.spec.workers
    patch.spec["drained"] = list(runner.controller.spec.drained)
    return rollout


def _post_events(body, before: dict, after: dict) -> None:
    """An Event on each condition that changed, and on a drain or migrate that ended."""
    old = {c["type"]: c for c in before.get("conditions") or []}
    for c in after.get("conditions") or []:
        prev = old.get(c["type"])
        if prev is not None and prev.get("status") == c["status"]:
            continue
        if c["type"] == "Ready" and c["status"] == "True":
            kopf.info(body, reason="Ready", message=c["message"])
        elif c["type"] == "Scaling" and c["status"] == "True" and prev is not None:
            kopf.info(body, reason="Scaling", message=c["message"] or "scaling")
        elif c["type"] == "Updating" and c["status"] == "False" and prev is not None:
            kopf.info(body, reason="Updated", message=c["message"])
        elif c["type"] == "Degraded" and c["status"] == "True":
            kopf.warn(body, reason="Degraded", message=c["message"])
    action, last = after.get("lastAction") or {}, before.get("lastAction") or {}
    if action.get("state") in ("Succeeded", "Failed") and action != last:
        (kopf.info if action["state"] == "Succeeded" else kopf.warn)(
            body, reason=f"{action['action'].split()[0].capitalize()}{action['state']}", message=action["message"])


@kopf.on.cleanup()
def _cleanup(**_) -> None:
    with RUNNERS_LOCK:
        runners = list(RUNNERS.values())
        RUNNERS.clear()
    for runner in runners:
        runner.stop()


# -- the process ------------------------------------------------------------------------------


def operator_metrics(clusters: dict[str, ControllerMetrics | None]) -> str:
    """/metrics of the operator: each cluster's controller metrics labelled cluster="NAMESPACE/NAME" (None:
    its controller has not started yet), and how many clusters it runs."""
    def gauge(name: str, value: float, **labels: str) -> Sample:
        return Sample(name, "gauge", name, labels, value)

    samples = [gauge("moecluster_operator_clusters", len(clusters))]
    samples += [gauge("moecluster_operator_cluster_started", int(m is not None), cluster=k) for k, m in sorted(clusters.items())]
    for key, metrics in sorted(clusters.items()):
        samples += metrics.samples(cluster=key) if metrics is not None else []
    return exposition(samples)


CONTROLLER_RPCS = RpcLatency("moecluster_controller_rpc_seconds")  # every cluster's controller calls, together


def _render_metrics() -> str:
    with RUNNERS_LOCK:
        runners = dict(RUNNERS)
    return (operator_metrics({k: r.controller.metrics if r.controller else None for k, r in runners.items()})
            + rendered(CONTROLLER_RPCS.histogram))


def serve_controllers(host: str, port: int) -> grpc.Server:
    server = endpoints.server(32, handlers=[ROUTER], interceptors=[CONTROLLER_RPCS])
    if endpoints.listen(server, f"{host}:{port}") == 0:
        raise SystemExit(f"moecluster-operator: cannot listen on {host}:{port}")
    server.start()
    return server


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="moecluster-operator", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--namespace", action="append", default=[],
                        help="watch only this namespace (repeat for several); default: every namespace")
    parser.add_argument("--controller-host", default="0.0.0.0", help="address the controllers' gRPC API binds to")
    parser.add_argument("--controller-port", type=int, default=50055, help="port of the controllers' gRPC API")
    parser.add_argument("--controller-address", default=SETTINGS.controller_address,
                        help="HOST:PORT frontends dial to reach it, e.g. the operator Service's DNS name "
                        "(env MOECLUSTER_CONTROLLER_ADDRESS)")
    parser.add_argument("--default-image", default=SETTINGS.default_image,
                        help="image of workers and frontends when a MoECluster names none (env MOECLUSTER_DEFAULT_IMAGE)")
    parser.add_argument("--liveness-port", type=int, default=8080, help="kopf's /healthz port (0: off)")
    parser.add_argument("--liveness-host", default="0.0.0.0")
    parser.add_argument("--metrics-port", type=int, default=9090,
                        help="Prometheus /metrics of every cluster's controller, labelled by cluster (0: off)")
    parser.add_argument("--metrics-host", default="0.0.0.0")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if not args.controller_address:
        parser.error("--controller-address (or MOECLUSTER_CONTROLLER_ADDRESS) is required: frontends dial it")
    SETTINGS.controller_address, SETTINGS.default_image = args.controller_address, args.default_image
    try:
        internal_tls.folder()  # a mounted Secret missing a file fails here, not at the first cluster
    except ValueError as err:
        parser.error(str(err))
    try:
        kube_config.load_incluster_config()
    except kube_config.ConfigException:
        kube_config.load_kube_config()  # outside a cluster: $KUBECONFIG or ~/.kube/config
    server = serve_controllers(args.controller_host, args.controller_port)
    try:
        metrics = serve_metrics(_render_metrics, args.metrics_port, args.metrics_host) if args.metrics_port else None
    except OSError as err:
        raise SystemExit(f"moecluster-operator: cannot serve /metrics on {args.metrics_host}:{args.metrics_port}: {err}")
    liveness = f"http://{args.liveness_host}:{args.liveness_port}/healthz" if args.liveness_port else None
    try:
        kopf.run(standalone=True, clusterwide=not args.namespace, namespaces=args.namespace, liveness_endpoint=liveness)
    finally:
        server.stop(2).wait()
        if metrics is not None:
            metrics.stop()


if __name__ == "__main__":
    main()
