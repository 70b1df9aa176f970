"""The Kubernetes operator's pure parts: manifests, status, annotations, and the controller router over real gRPC."""

from __future__ import annotations

from concurrent import futures

import grpc
import pytest
from moecluster.backends import k8s_resources as r
from moecluster.cli.kubectl_moe import format_snapshots, format_status
from moecluster.controller.router import ControllerRouter
from moecluster.frontend.table_watcher import cluster_metadata
from moecluster.protos import controller_pb2, controller_pb2_grpc
from pydantic import ValidationError

SPEC = {"model": {"path": "/models/tiny", "volume": {"persistentVolumeClaim": {"claimName": "models"}}, "mountPath": "/models"},
        "replicas": 3, "minReplicasPerExpert": 2, "worker": {"resources": {"limits": {"nvidia.com/gpu": 1}}, "dtype": "bfloat16"},
        "frontend": {"replicas": 2}, "image": "moecluster:test"}


def resource(**spec) -> r.Resource:
    return r.Resource("ml", "mixtral", "uid-1", {**SPEC, **spec}, generation=4)


def test_cluster_spec_from_the_resource():
    spec = r.cluster_spec(resource())
    assert (spec.workers, spec.min_replicas, spec.model, spec.worker_num_gpus) == (3, 2, "/models/tiny", 1.0)
    assert spec.drained == () and r.cluster_spec(resource(drained=["worker-0"])).drained == ("worker-0",)
    assert not spec.colocate and r.cluster_spec(resource(colocate=True)).colocate
    assert spec.rebalance_above == 1.3 and r.cluster_spec(resource(rebalanceAbove=100)).rebalance_above == 100
    with pytest.raises(ValidationError, match="rebalance_above"):
        r.cluster_spec(resource(rebalanceAbove=1.0))
    assert spec.rebalance_min_load == 50 and r.cluster_spec(resource(rebalanceMinLoad=0)).rebalance_min_load == 0
    assert spec.max_replicas is None and r.cluster_spec(resource(maxReplicasPerExpert=3)).max_replicas == 3
    with pytest.raises(ValidationError, match="min_replicas"):
        r.cluster_spec(resource(replicas=1))


def test_worker_pod_is_owned_restricted_and_mounts_the_model():
    pod = r.worker_pod(resource(), "worker-7", default_image="unused")
    meta, spec = pod["metadata"], pod["spec"]
    assert meta["name"] == "mixtral-worker-7" and meta["labels"][r.WORKER_LABEL] == "worker-7"
    assert meta["ownerReferences"][0] == {"apiVersion": "moecluster.io/v1alpha1", "kind": "MoECluster", "name": "mixtral",
                                          "uid": "uid-1", "controller": True, "blockOwnerDeletion": True}
    container = spec["containers"][0]
    assert container["image"] == "moecluster:test"
    assert container["args"][container["args"].index("--host") + 1] == "$(POD_IP)"  # serves at its pod IP
    assert container["args"][container["args"].index("--dtype") + 1] == "bfloat16"
    assert container["resources"] == {"limits": {"nvidia.com/gpu": 1}}
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"} and spec["securityContext"]["runAsNonRoot"]
    assert {"name": "model", "persistentVolumeClaim": {"claimName": "models"}} in spec["volumes"]
    assert {"name": "model", "mountPath": "/models", "readOnly": True} in container["volumeMounts"]
    assert spec["restartPolicy"] == "Never"  # a dead worker is replaced by a new one, never restarted empty


def test_snapshots_live_on_a_volume_every_worker_mounts_read_write_and_no_frontend_does():
    assert r.cluster_spec(resource()).snapshot_dir is None
    res = resource(snapshots={"volume": {"persistentVolumeClaim": {"claimName": "moe-snaps"}}, "everySeconds": 600})
    spec = r.cluster_spec(res)
    assert (spec.snapshot_dir, spec.snapshot_every_s, spec.snapshot_keep) == ("/snapshots", 600, 3)
    pod = r.worker_pod(res, "worker-0", default_image="unused")["spec"]
    assert {"name": "snapshots", "persistentVolumeClaim": {"claimName": "moe-snaps"}} in pod["volumes"]
    assert {"name": "snapshots", "mountPath": "/snapshots"} in pod["containers"][0]["volumeMounts"]  # not read-only
    frontend = r.frontend_deployment(res, "127.0.0.1:1", default_image="unused")["spec"]["template"]["spec"]
    assert all(v["name"] != "snapshots" for v in frontend["volumes"])
    moved = resource(snapshots={"volume": {"emptyDir": {}}, "mountPath": "/data/snaps", "keep": 0})
    assert (r.cluster_spec(moved).snapshot_dir, r.cluster_spec(moved).snapshot_keep) == ("/data/snaps", 0)
    with pytest.raises(ValidationError, match="snapshot_every_s"):
        r.cluster_spec(resource(snapshots={"volume": {"emptyDir": {}}, "everySeconds": 0}))


def test_a_worker_that_asks_for_a_gpu_keeps_its_experts_on_it_unless_told_otherwise():
    def device(worker):
        args = r.worker_pod(resource(worker=worker), "worker-0", default_image="")["spec"]["containers"][0]["args"]
        return args[args.index("--device") + 1], r.cluster_spec(resource(worker=worker)).worker_device

    assert device(SPEC["worker"]) == ("cuda", "cuda")
    assert device({"resources": {"requests": {"cpu": "2"}}}) == ("cpu", "cpu")
    assert device({**SPEC["worker"], "device": "cpu"}) == ("cpu", "cpu")
    with pytest.raises(ValidationError, match="worker_device"):
        r.cluster_spec(resource(worker={"device": "tpu"}))


def test_a_frontend_that_asks_for_a_gpu_runs_the_dense_model_on_it_unless_told_otherwise():
    def device(frontend):
        deployment = r.frontend_deployment(resource(frontend=frontend), "op:50151", default_image="img")
        args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
        return args[args.index("--device") + 1], r.cluster_spec(resource(frontend=frontend)).frontend_device

    gpu = {"resources": {"limits": {"nvidia.com/gpu": 1}}}
    assert device(gpu) == ("cuda", "cuda")
    assert device({}) == ("cpu", "cpu")
    assert device({**gpu, "device": "cpu"}) == ("cpu", "cpu")
    with pytest.raises(ValidationError, match="frontend_device"):
        r.cluster_spec(resource(frontend={"device": "tpu"}))


def test_serving_settings_reach_the_worker_and_frontend_processes_only_when_set():
    def args(res):
        worker = r.worker_pod(res, "worker-0", default_image="img")["spec"]["containers"][0]["args"]
        frontend = r.frontend_deployment(res, "op:50151", default_image="img")["spec"]["template"]["spec"]
        return worker, frontend["containers"][0]["args"]

    worker, frontend = args(resource())
    assert not {"--batch-tokens", "--compute-threads"} & set(worker)
    assert not {"--generate-cache-tokens", "--forward-batch-tokens"} & set(frontend)
    res = resource(worker={**SPEC["worker"], "batchTokens": 0, "computeThreads": 3},
                   frontend={"replicas": 2, "generateCacheTokens": 65536, "forwardBatchTokens": 0})
    spec = r.cluster_spec(res)
    assert (spec.worker_batch_tokens, spec.worker_compute_threads, spec.generate_cache_tokens) == (0, 3, 65536)
    assert spec.forward_batch_tokens == 0
    worker, frontend = args(res)
    assert worker[-4:] == ["--batch-tokens", "0", "--compute-threads", "3"]
    assert frontend[-4:] == ["--generate-cache-tokens", "65536", "--forward-batch-tokens", "0"]
    with pytest.raises(ValidationError, match="below one page of the KV cache"):
        r.cluster_spec(resource(frontend={"generateCacheTokens": 16}))
    with pytest.raises(ValidationError, match="worker_compute_threads"):
        r.cluster_spec(resource(worker={"computeThreads": 0}))


def test_image_falls_back_to_the_operators_and_is_required():
    spec = {k: v for k, v in SPEC.items() if k != "image"}
    pod = r.worker_pod(r.Resource("ml", "m", "u", spec), "worker-0", default_image="registry/moecluster:1")
    assert pod["spec"]["containers"][0]["image"] == "registry/moecluster:1"
    with pytest.raises(ValueError, match="default-image"):
        r.worker_pod(r.Resource("ml", "m", "u", spec), "worker-0", default_image="")


def test_frontend_names_its_cluster_to_the_shared_controller_endpoint():
    deployment = r.frontend_deployment(resource(), "op.system.svc:50055", default_image="")
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--controller") + 1] == "op.system.svc:50055"
    assert args[args.index("--cluster") + 1] == "ml/mixtral"
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    service = r.frontend_service(resource(service={"type": "LoadBalancer", "port": 443}))
    assert service["spec"]["type"] == "LoadBalancer" and service["spec"]["ports"][0]["port"] == 443
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]


def test_a_frontend_with_api_keys_and_tls_mounts_their_secrets_and_is_probed_over_tcp():
    plain = r.frontend_deployment(resource(), "op:50055", default_image="")["spec"]["template"]["spec"]
    assert plain["containers"][0]["readinessProbe"]["grpc"] == {"port": r.FRONTEND_PORT}
    assert "--api-keys" not in plain["containers"][0]["args"] and "--tls-cert" not in plain["containers"][0]["args"]
    frontend = {"replicas": 2, "apiKeys": {"secretName": "keys", "key": "clients"}, "tls": {"secretName": "cert"}}
    res = resource(frontend=frontend)
    pod = r.frontend_deployment(res, "op:50055", default_image="")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    args = dict(zip(container["args"][::2], container["args"][1::2]))
    assert (args["--api-keys"], args["--tls-cert"], args["--tls-key"]) == (
        "/etc/moecluster/api-keys/clients", "/etc/moecluster/tls/tls.crt", "/etc/moecluster/tls/tls.key")
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["api-keys"]["secret"] == {"secretName": "keys"} and volumes["tls"]["secret"] == {"secretName": "cert"}
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["tls"] == {"name": "tls", "mountPath": "/etc/moecluster/tls", "readOnly": True}
    assert mounts["api-keys"]["mountPath"] == "/etc/moecluster/api-keys" and mounts["api-keys"]["readOnly"]
    assert container["readinessProbe"]["tcpSocket"] == {"port": r.FRONTEND_PORT} and "grpc" not in container["readinessProbe"]
    worker = r.worker_pod(res, "worker-0", default_image="")
    assert {v["name"] for v in worker["spec"]["volumes"]}.isdisjoint({"api-keys", "tls"})  # the frontends' alone
    moved = resource(frontend={"apiKeys": {"secretName": "keys", "mountPath": "/tmp/e2e/keys"}})
    assert r.cluster_spec(moved).api_keys_file == "/tmp/e2e/keys/api-keys"  # the Secret's default key


def test_internal_tls_mounts_the_clusters_certificates_in_workers_and_frontends_and_probes_workers_over_tcp():
    res = resource(internalTLS={"secretName": "ml-internal"})
    worker, frontend = (r.worker_pod(res, "worker-0", default_image="")["spec"],
                        r.frontend_deployment(res, "op:50055", default_image="")["spec"]["template"]["spec"])
    for pod in (worker, frontend):
        container = pod["containers"][0]
        assert {"name": "internal-tls", "secret": {"secretName": "ml-internal"}} in pod["volumes"]
        assert {"name": "internal-tls", "mountPath": r.INTERNAL_TLS_MOUNT, "readOnly": True} in container["volumeMounts"]
        assert {"name": "MOECLUSTER_INTERNAL_TLS", "value": r.INTERNAL_TLS_MOUNT} in container["env"]
    assert worker["containers"][0]["readinessProbe"]["tcpSocket"] == {"port": r.WORKER_PORT}
    assert frontend["containers"][0]["readinessProbe"]["grpc"] == {"port": r.FRONTEND_PORT}  # its public port: plaintext
    plain = r.worker_pod(resource(), "worker-0", default_image="")["spec"]["containers"][0]
    assert plain["readinessProbe"]["grpc"] == {"port": r.WORKER_PORT}
    assert not any(e["name"] == "MOECLUSTER_INTERNAL_TLS" for e in plain["env"])
    assert r.worker_template(res, "") != r.worker_template(resource(), ""), "turning it on must roll the workers"
    moved = r.worker_pod(resource(internalTLS={"secretName": "s", "mountPath": "/tmp/x"}), "w", "")["spec"]["containers"][0]
    assert {"name": "MOECLUSTER_INTERNAL_TLS", "value": "/tmp/x"} in moved["env"]


def test_the_operator_refuses_a_cluster_whose_internal_tls_is_not_its_own(tmp_path, monkeypatch):
    """One controller port serves every cluster's frontends: mutual TLS is all or none under one operator."""
    from moecluster.backends.k8s_operator import _checked
    from moecluster.wire import internal_tls

    monkeypatch.delenv(internal_tls.ENV, raising=False)
    _checked(resource())
    with pytest.raises(ValueError, match="holds no certificates"):
        _checked(resource(internalTLS={"secretName": "ml-internal"}))
    monkeypatch.setenv(internal_tls.ENV, str(internal_tls.generate(tmp_path / "certs", "ops")))
    _checked(resource(internalTLS={"secretName": "ml-internal"}))
    with pytest.raises(ValueError, match="set spec.internalTLS"):
        _checked(resource())


def controller_status(converged=True, serving=3, dead=(), error=""):
    workers = [{"id": f"worker-{i}", "address": "", "pid": 0, "state": "serving", "experts": [[0, i], [1, i]], "load": 0,
                "device": "cuda:0"} for i in range(serving)]
    return {"workers": workers, "dead": list(dead), "desired_workers": 3, "converged": converged, "last_error": error,
            "epoch": 9, "imbalance": 1.0, "step": 12, "lowest_step": 12, "trainers": [],
            "snapshot": "/snapshots/step-00000010", "restored": "", "rollbacks": [],
            "snapshots": [{"step": 10, "path": "/snapshots/step-00000010", "experts": 6, "bytes": 3_000_000,
                           "trainer_state": False},
                          {"step": 8, "path": "/snapshots/step-00000008", "experts": 6, "bytes": 3_000_000,
                           "trainer_state": True}]}


def test_status_conditions_and_transition_times():
    res = resource()
    ready = r.status_patch(res, controller_status(), 3, {}, "2026-01-01T00:00:00Z")
    assert (ready["replicas"], ready["readyReplicas"], ready["epoch"], ready["observedGeneration"]) == (3, 3, 9, 4)
    assert ready["labelSelector"] == "moecluster.io/cluster=mixtral,app.kubernetes.io/component=worker"
    assert ready["endpoint"] == "mixtral.ml.svc:50051"
    by_type = {c["type"]: c for c in ready["conditions"]}
    assert (by_type["Ready"]["status"], by_type["Scaling"]["status"], by_type["Degraded"]["status"]) == ("True", "False", "False")
    assert ready["placement"] == "6 experts, 6 copies on 3 workers, imbalance 1.00"
    leaving = {**controller_status(), "colocated": 0.625}
    leaving["workers"][0]["state"] = "leaving"  # its copies still count, and so does it
    assert r.status_patch(res, leaving, 3, {}, "2026-01-01T00:00:00Z")["placement"] == (
        "6 experts, 6 copies on 3 workers, imbalance 1.00, 62% of pairs co-located")
    # Still ready a minute later: the transition time stays; scaling up: Ready goes False with a new time.
    later = r.status_patch(res, controller_status(), 3, ready, "2026-01-01T00:01:00Z")
    assert {c["type"]: c for c in later["conditions"]}["Ready"]["lastTransitionTime"] == "2026-01-01T00:00:00Z"
    degraded = controller_status(converged=False, serving=2, dead=["worker-2"])
    scaling = r.status_patch(res, degraded, 3, later, "2026-01-01T00:02:00Z")
    by_type = {c["type"]: c for c in scaling["conditions"]}
    assert by_type["Ready"]["status"] == "False" and by_type["Ready"]["lastTransitionTime"] == "2026-01-01T00:02:00Z"
    assert by_type["Scaling"]["message"] == "2/3 workers serving"
    waiting = controller_status(converged=False, serving=2)
    waiting["workers"].append({**waiting["workers"][0], "id": "worker-3", "state": "starting", "experts": []})
    by_type = {c["type"]: c for c in r.status_patch(res, waiting, 3, later, "2026-01-01T00:02:00Z")["conditions"]}
    assert by_type["Scaling"]["message"] == "2/3 workers serving; starting worker-3"  # what the scale waits for
    by_type = {c["type"]: c for c in scaling["conditions"]}
    assert by_type["Degraded"]["status"] == "True" and "worker-2" in by_type["Degraded"]["message"]
    starting = r.status_patch(res, None, 1, {}, "2026-01-01T00:00:00Z", "ImagePullBackOff")
    assert starting["placement"] == "starting" and "ImagePullBackOff" in starting["conditions"][0]["message"]


def test_standby_spares_are_not_counted_as_replicas():
    spec = r.cluster_spec(resource(standbyWorkers=1))
    assert spec.standby_workers == 1
    status = controller_status()
    status["workers"].append({"id": "worker-3", "address": "", "pid": 0, "state": "standby", "experts": [], "load": 0})
    patch = r.status_patch(resource(standbyWorkers=1), status, 4, {}, "t")
    assert (patch["replicas"], patch["readyReplicas"]) == (3, 3)  # the scale subresource sees the pool, not the spare
    assert {c["type"]: c["status"] for c in patch["conditions"]}["Ready"] == "True"


def test_migrate_annotation_parsing():
    assert r.parse_migrate("1:5=worker-3") == ((1, 5), "worker-3")
    with pytest.raises(ValueError, match="LAYER:EXPERT=WORKER"):
        r.parse_migrate("1-5 to worker-3")


def test_kubectl_moe_status_text():
    obj = {"metadata": {"namespace": "ml", "name": "mixtral"}, "spec": {"replicas": 3},
           "status": {**r.status_patch(resource(), controller_status(), 3, {}, "t"),
                      "lastAction": {"action": "drain worker-1", "state": "Succeeded", "message": "done"}}}
    text = format_status(obj)
    assert text.splitlines()[0] == "ml/mixtral: 3/3 workers ready, epoch 9, 1 copies per expert"
    assert "mixtral-worker-2" in text and text.splitlines()[-3].split()[-3:] == ["2", "cuda:0", "?"]
    assert "last action: drain worker-1: Succeeded done" in text
    assert "training:  step 12, last snapshot /snapshots/step-00000010" in text and "cut off" not in text
    obj["status"]["training"]["lowestStep"] = 11
    assert "experts at steps 11..12: an update was cut off" in format_status(obj)
    assert [line.split()[:3] + line.split()[-3:] for line in format_snapshots(obj).splitlines()] == [
        ["step", "10", "6", "experts", "only", "/snapshots/step-00000010"],
        ["step", "8", "6", "trainer", "state", "/snapshots/step-00000008"]]  # the newest first; which a resume can use
    obj["status"]["training"]["snapshots"] = []
    assert format_snapshots(obj) == "no snapshots (no spec.snapshots: no volume)"


def test_kubectl_moe_says_what_a_long_wait_waits_for(monkeypatch, capsys):
    """A scale whose new pod finds no room: after a while the wait names the pod it waits for and the error."""
    from moecluster.cli import kubectl_moe

    stuck = controller_status(converged=False, serving=2, error="start/worker-3: 0/4 nodes are available")
    stuck["workers"].append({**stuck["workers"][0], "id": "worker-3", "state": "starting", "experts": []})
    objects = iter([{"metadata": {"generation": 4}, "status": r.status_patch(resource(), status, 3, {}, "t")}
                    for status in (stuck, stuck, controller_status())])

    class Cluster:  # stands where the kube-apiserver would: the resource as the operator wrote it
        def get(self, name):
            return next(objects)

    monkeypatch.setattr(kubectl_moe, "SAY_WAITING_AFTER_S", 0.0)
    monkeypatch.setattr(kubectl_moe.time, "sleep", lambda s: None)
    kubectl_moe.wait_ready(Cluster(), "mixtral", 3, timeout=60)
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["2/3 workers serving, epoch 9; waiting for worker-3 to start; start/worker-3: 0/4 nodes are available",
                     "done: 3 workers serving at epoch 9"]


class NamedController(controller_pb2_grpc.ControllerServicer):
    def __init__(self, name):
        self.name = name

    def Status(self, request, context):
        return controller_pb2.StatusResponse(name=self.name)


def test_router_sends_each_call_to_the_cluster_it_names():
    router = ControllerRouter()
    router.register("ml/a", NamedController("a"))
    router.register("ml/b", NamedController("b"))
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), handlers=[router])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = controller_pb2_grpc.ControllerStub(channel)
            for name in ("a", "b"):
                answer = stub.Status(controller_pb2.StatusRequest(), metadata=cluster_metadata(f"ml/{name}"), timeout=5)
                assert answer.name == name
            router.unregister("ml/a")
            with pytest.raises(grpc.RpcError) as err:
                stub.Status(controller_pb2.StatusRequest(), metadata=cluster_metadata("ml/a"), timeout=5)
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
            assert router.clusters() == ["ml/b"]
    finally:
        server.stop(0)


def test_operator_metrics_label_each_cluster_and_keep_every_family_together():
    from moecluster.backends.k8s_operator import operator_metrics
    from moecluster.controller.metrics import ControllerMetrics
    from moecluster.observability.prometheus import parse

    a, b = ControllerMetrics(), ControllerMetrics()
    a.epoch(4)
    b.epoch(9)
    a.bytes_moved("peer", 100)
    b.step_seconds("PullExpert", 0.5)
    text = operator_metrics({"ml/a": a, "ml/b": b, "ml/starting": None})
    types = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")]
    assert len(types) == len(set(types)), "one TYPE line per family"
    names = [line.split("{")[0].split()[0] for line in text.splitlines() if not line.startswith("#")]
    families = [n.removesuffix("_count").removesuffix("_sum") for n in names]  # a summary's two series
    runs = [f for i, f in enumerate(families) if i == 0 or f != families[i - 1]]
    assert len(runs) == len(set(runs)), f"a family's samples are not together: {runs}"
    samples = {(n, labels.get("cluster")): v for n, labels, v in parse(text) if "step" not in labels}
    assert samples[("moecluster_epoch", "ml/a")] == 4 and samples[("moecluster_epoch", "ml/b")] == 9
    assert samples[("moecluster_operator_clusters", None)] == 3
    assert samples[("moecluster_operator_cluster_started", "ml/starting")] == 0
    assert samples[("moecluster_bytes_moved_total", "ml/a")] == 100
