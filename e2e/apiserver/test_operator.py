"""The operator against a real API server: `helm install`, a MoECluster, `kubectl scale`, pod loss, restarts, uninstall.

The chart is installed with `operator.replicas=0` and the operator runs here as
a local process with a token of the chart's ServiceAccount, so a permission the
chart's RBAC lacks fails these tests. Worker and frontend pods are run by the
fake kubelet (`fake_kubelet.py`) as local processes on 127.0.0.x; requests go
through the frontend Service's ClusterIP (the fake kube-proxy). Tests run in
file order and share one MoECluster, as a user's session would.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from chart_render import dashboard, queries, render
from operator_cluster import NAME, NS, READY_TIMEOUT_S, Handle, assert_clean, manifest
from operator_process import Operator

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "moecluster"
RELEASE, SYSTEM_NS = "moe", "moecluster-system"


@pytest.fixture(scope="module")
def moe(kube, tmp_path_factory):
    """The chart installed, the operator running, a 2-worker MoECluster Ready; yields a handle for the tests."""
    from moecluster.models.tiny import create_checkpoint
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("operator")
    model = create_checkpoint("mixtral", root / "tiny-mixtral", seed=3)
    batch = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()(batch).logits

    kube.helm("install", RELEASE, str(CHART), "--namespace", SYSTEM_NS, "--create-namespace",
              "--set", "operator.replicas=0", "--wait", "--timeout", "120s")
    sa = kube.kubectl("get", "serviceaccount", "-n", SYSTEM_NS, "-l", f"app.kubernetes.io/instance={RELEASE}",
                      "-o", "jsonpath={.items[0].metadata.name}").stdout.strip()
    assert sa, "the chart created no ServiceAccount"
    operator = Operator(kube.token_kubeconfig(SYSTEM_NS, sa), root / "operator.log")
    operator.start()
    kube.create_namespace(NS)
    # Pod Security admission checks every pod the operator makes against the `restricted` profile.
    kube.kubectl("label", "namespace", NS, "pod-security.kubernetes.io/enforce=restricted")
    kube.kubectl("apply", "-f", "-", input=manifest(model, 2))
    handle = Handle(kube, operator, model, batch, expected, sa)
    try:
        handle.wait_ready(2)
        yield handle
    except BaseException:
        print(f"----- operator log -----\n{operator.log.read_text()[-6000:]}")
        raise
    finally:
        operator.stop()
        print(f"----- operator log (tail) -----\n{operator.log.read_text()[-3000:]}")


def test_status_scale_subresource_and_printer_columns(moe):
    obj = moe.get()
    status = obj["status"]
    assert status["labelSelector"] == f"moecluster.io/cluster={NAME},app.kubernetes.io/component=worker"
    assert status["observedGeneration"] == obj["metadata"]["generation"]
    assert status["endpoint"] == f"{NAME}.{NS}.svc:50051"
    assert status["placement"].startswith("16 experts, 32 copies on 2 workers")  # 2 layers x 8, 2 copies each
    path = f"/apis/moecluster.io/v1alpha1/namespaces/{NS}/moeclusters/{NAME}/scale"
    scale = json.loads(moe.kube.kubectl("get", "--raw", path).stdout)
    assert (scale["spec"]["replicas"], scale["status"]["replicas"]) == (2, 2)
    assert scale["status"]["selector"] == status["labelSelector"]
    table = moe.kube.kubectl("get", "moe", NAME, "-n", NS).stdout
    assert table.split("\n")[0].split()[:6] == ["NAME", "REPLICAS", "READY", "UP-TO-DATE", "EPOCH", "STATUS"]
    assert table.split("\n")[1].split()[:4] == [NAME, "2", "2", "2"] and "Serving" in table
    jsonpath = "jsonpath={range .items[*]}{.metadata.ownerReferences[0].kind}/{.metadata.ownerReferences[0].name} {end}"
    owned = moe.kube.kubectl("get", "services,deployments", "-n", NS, "-l", f"moecluster.io/cluster={NAME}",
                             "-o", jsonpath).stdout.split()
    owned += moe.kube.kubectl("get", "pods", "-n", NS, "-l", f"moecluster.io/cluster={NAME},app.kubernetes.io/component=worker",
                              "-o", jsonpath).stdout.split()
    assert len(owned) == 5 and set(owned) == {f"MoECluster/{NAME}"}, owned  # 2 services, 1 deployment, 2 worker pods
    about = f"involvedObject.kind=MoECluster,involvedObject.name={NAME}"
    events = moe.kube.kubectl("get", "events", "-n", NS, "--field-selector", about,
                              "-o", "jsonpath={range .items[*]}{.reason} {end}").stdout.split()
    assert "Ready" in events, events


def test_serves_the_answers_of_transformers_through_the_service(moe):
    from moecluster.sdk.client import Client

    with Client(moe.address(), timeout=60) as client:
        logits = client.forward(moe.batch)
    torch.testing.assert_close(logits, moe.expected, rtol=0, atol=1e-4)


def test_the_serving_settings_reach_the_pods_and_a_bad_one_is_refused(moe):
    """The CRD keeps worker.computeThreads and the frontend's generateCacheTokens and forwardBatchTokens (an unknown
    field would be pruned on its way in), the operator passes them to the processes, and the API server refuses a
    cache under a page."""
    from moecluster.sdk.client import Client

    args = json.loads(moe.kube.kubectl("get", "pod", moe.worker_pods()[0], "-n", NS, "-o",
                                       "jsonpath={.spec.containers[0].args}").stdout)
    assert args[args.index("--compute-threads") + 1] == "1" and "--batch-tokens" not in args
    with Client(moe.address(), timeout=60) as client:
        info = client.info()  # what the frontend process took
        assert (info.generate_cache_tokens, info.forward_batch_tokens) == (64, 128)
    bad = json.loads(manifest(moe.model, 2))
    bad["spec"]["frontend"]["generateCacheTokens"] = 16
    refused = moe.kube.kubectl("apply", "--dry-run=server", "-f", "-", input=json.dumps(bad), check=False)
    assert refused.returncode != 0 and "at least one 32-token page of KV cache" in refused.stderr, refused.stderr


def test_kubectl_scale_up_and_down_under_load(moe):
    with moe.load() as load:
        moe.kube.kubectl("scale", f"moecluster/{NAME}", "-n", NS, "--replicas=3")
        moe.wait_ready(3)
        assert len(moe.worker_pods()) == 3
        moe.kube.kubectl("scale", f"moecluster/{NAME}", "-n", NS, "--replicas=2")
        moe.wait_ready(2)
    assert_clean(load.report)
    assert len(moe.worker_pods()) == 2
    from moecluster.observability.prometheus import parse

    scraped = urllib.request.urlopen(f"http://127.0.0.1:{moe.operator.metrics_port}/metrics", timeout=10).read().decode()
    samples = {(name, labels.get("cluster", ""), labels.get("step", "")): v for name, labels, v in parse(scraped)}
    key = f"{NS}/{NAME}"
    assert samples[("moecluster_operator_clusters", "", "")] == 1
    assert samples[("moecluster_epoch", key, "")] >= 3 and samples[("moecluster_scale_seconds_count", key, "")] >= 0
    assert samples[("moecluster_step_seconds_count", key, "PullExpert")] >= 1, "the scale-up copied experts"
    acks = [v for name, labels, v in parse(scraped) if name == "moecluster_controller_rpc_seconds_count"
            and (labels["method"], labels["code"]) == ("AckEpoch", "OK")]  # the frontend took each new epoch
    assert acks and acks[0] >= 3, acks


# Labels Prometheus puts on every scraped series itself: the pod's namespace and name, and the
# chart's PodMonitor the pod's app.kubernetes.io/instance (its MoECluster).
TARGET_LABELS = {"namespace", "pod", "app_kubernetes_io_instance"}


def test_the_charts_alerts_and_dashboard_query_what_the_cluster_exports(moe):
    """Every series the chart's PrometheusRule and Grafana dashboard ask for, with every label they select or
    group on, is one this running cluster exports: scraped from the operator, the workers and the frontend
    (after the load above, so that the latency histograms have series)."""
    from moecluster.observability.prometheus import parse

    docs = render(moe.kube, "prometheusRule.enabled=true", "dashboard.enabled=true")
    variables = [v["query"]["query"] for v in dashboard(docs)["templating"]["list"] if isinstance(v.get("query"), dict)]
    exprs = queries(docs) + variables  # label_values(METRIC, LABEL): the metric must exist too
    assert len(exprs) >= 20

    pods = moe.kube.kubectl("get", "pods", "-n", NS, "-l", f"moecluster.io/cluster={NAME}", "-o",
                            "jsonpath={range .items[*]}{.status.podIP} {end}").stdout.split()
    addresses = [f"127.0.0.1:{moe.operator.metrics_port}", *(f"{ip}:9090" for ip in pods)]
    exported: dict[str, set[str]] = {}  # series name -> its label names
    for address in addresses:
        text = urllib.request.urlopen(f"http://{address}/metrics", timeout=10).read().decode()
        for name, labels, _ in parse(text):
            exported.setdefault(name, set()).update(labels)
    assert len(pods) == 3 and "moecluster_frontend_rpc_seconds_bucket" in exported  # 2 workers, a frontend

    for expr in exprs:
        names = re.findall(r"\b(moecluster_\w+)", expr)
        assert names, expr
        missing = [n for n in names if n not in exported]
        assert not missing, f"{expr}\nasks for {missing}, which nothing exports"
        labels = set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)\s*\"", expr))
        labels |= {label.strip() for group in re.findall(r"by \(([^)]*)\)", expr) for label in group.split(",")}
        known = TARGET_LABELS.union(*(exported[n] for n in names))
        assert labels <= known, f"{expr}\nselects or groups on {labels - known}, which its series lack"


def test_kubectl_delete_worker_pod_under_load(moe):
    before = moe.worker_pods()
    epoch = moe.get()["status"]["epoch"]
    with moe.load() as load:
        time.sleep(1.0)
        moe.kube.kubectl("delete", "pod", before[0], "-n", NS, "--wait=false")
        moe.wait_ready(2, since_epoch=epoch)
        time.sleep(1.0)
    assert_clean(load.report)
    after = moe.worker_pods()
    assert before[0] not in after and len(after) == 2


def test_crashed_worker_process_is_replaced_under_load(moe):
    pod = moe.worker_pods()[-1]
    pid = moe.kube.harness.process_pid(NS, pod)
    assert pid, f"no process for pod {pod}"
    epoch = moe.get()["status"]["epoch"]
    with moe.load() as load:
        time.sleep(1.0)
        os.kill(pid, signal.SIGKILL)
        moe.wait_ready(2, since_epoch=epoch)
        time.sleep(1.0)
    assert_clean(load.report)
    assert pod not in moe.worker_pods()


def test_operator_restart_mid_scale(moe):
    with moe.load() as load:
        moe.kube.kubectl("scale", f"moecluster/{NAME}", "-n", NS, "--replicas=3")
        time.sleep(1.5)  # the new worker pod is being created or started
        moe.operator.kill()
        time.sleep(1.0)
        moe.operator.start()
        moe.wait_ready(3)
        moe.kube.kubectl("scale", f"moecluster/{NAME}", "-n", NS, "--replicas=2")
        moe.wait_ready(2)
    assert_clean(load.report)
    assert len(moe.worker_pods()) == 2


def test_a_standby_spare_takes_a_scale_up(moe):
    """With standbyWorkers 1 an empty worker pod waits; `kubectl scale` makes it a member instead of starting a pod."""
    patch = lambda n: moe.kube.kubectl("patch", "moecluster", NAME, "-n", NS, "--type=merge",  # noqa: E731
                                       "-p", json.dumps({"spec": {"standbyWorkers": n}}))
    patch(1)
    deadline = time.monotonic() + 120
    while not (spares := [w["id"] for w in moe.get()["status"].get("workers", []) if w["state"] == "standby"]):
        assert time.monotonic() < deadline, f"no spare after 120 s: {moe.get()['status']}"
        time.sleep(0.5)
    assert len(moe.worker_pods()) == 3 and moe.get()["status"]["replicas"] == 2  # the spare is not a replica
    with moe.load() as load:
        moe.kube.kubectl("scale", f"moecluster/{NAME}", "-n", NS, "--replicas=3")
        obj = moe.wait_ready(3)
    assert_clean(load.report)
    assert spares[0] in {w["id"] for w in obj["status"]["workers"] if w["state"] == "serving"}
    patch(0)
    moe.kube.kubectl("scale", f"moecluster/{NAME}", "-n", NS, "--replicas=2")
    moe.wait_ready(2)
    deadline = time.monotonic() + 120
    while len(moe.worker_pods()) != 2:  # the spare started after the scale-up goes too
        assert time.monotonic() < deadline, moe.worker_pods()
        time.sleep(0.5)


def kubectl_moe(moe, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "KUBECTL": moe.kube.bins["KUBECTL"]}
    return subprocess.run([sys.executable, "-m", "moecluster.cli.kubectl_moe", "--kubeconfig", str(moe.kube.kubeconfig),
                           "-n", NS, *args], capture_output=True, text=True, timeout=400, env=env)


def test_kubectl_moe_plugin(moe):
    status = kubectl_moe(moe, "status", NAME)
    assert status.returncode == 0, status.stderr
    assert status.stdout.startswith(f"{NS}/{NAME}: 2/2 workers ready")
    workers = [w["id"] for w in moe.get()["status"]["workers"]]
    scaled = kubectl_moe(moe, "scale", NAME, "--replicas", "3")
    assert scaled.returncode == 0 and "done: 3 workers serving" in scaled.stdout, scaled.stderr
    new = sorted(set(w["id"] for w in moe.get()["status"]["workers"]) - set(workers))[0]
    moved = kubectl_moe(moe, "migrate", NAME, "1:7", "--to", new)
    # 1:7 may already be on the new worker (placed when it joined): then the operator says so and fails cleanly.
    holders = {w["id"] for w in moe.get()["status"]["workers"]}
    assert moved.returncode == 0 or "already" in moved.stderr, moved.stderr
    assert new in holders
    drained = kubectl_moe(moe, "drain", NAME, new)
    assert drained.returncode == 0, drained.stderr + drained.stdout
    obj = moe.wait_ready(2)
    assert new not in {w["id"] for w in obj["status"]["workers"]} and obj["spec"]["replicas"] == 2
    assert obj["spec"]["drained"] == [new]  # in the same patch as replicas: a restarted operator goes on with it
    again = kubectl_moe(moe, "drain", NAME, new)  # keyed by its worker: asked again, nothing more is drained
    assert again.returncode == 0 and f"{new} has left the pool" in again.stdout, again.stderr + again.stdout
    assert moe.get()["spec"]["replicas"] == 2
    kept = sorted(w["id"] for w in obj["status"]["workers"])
    with moe.load() as load:  # a replace: a new pod takes the old one's experts first; the pool keeps 2
        replaced = kubectl_moe(moe, "replace", NAME, kept[0])
    assert_clean(load.report)
    assert replaced.returncode == 0 and "done: 2 workers serving" in replaced.stdout, replaced.stderr + replaced.stdout
    obj = moe.wait_ready(2)
    now = {w["id"] for w in obj["status"]["workers"]}
    assert kept[0] not in now and len(now - set(kept)) == 1 and obj["spec"]["replicas"] == 2, obj["status"]
    assert obj["spec"]["drained"] == [new, kept[0]]
    bad = kubectl_moe(moe, "migrate", NAME, "one:two", "--to", "worker-0")
    assert bad.returncode != 0 and "LAYER:EXPERT" in bad.stderr


def test_a_changed_worker_template_rolls_every_worker_under_load(moe):
    """worker.computeThreads 1 -> 2: the operator replaces each worker pod in turn, a new one taking the old one's
    experts first, with no failed request; `kubectl moe rollout` waits for it. Under OnDelete nothing is replaced,
    and a template set back to what the pods run replaces nothing; with maxSurge 2 both go at once. The
    checkpoint of a cluster cannot change."""
    before = moe.worker_pods()
    assert moe.condition("Updating")["status"] == "False" and moe.get()["status"]["updatedReplicas"] == 2
    with moe.load() as load:
        moe.patch({"worker": {"computeThreads": 2}})
        rolled = kubectl_moe(moe, "rollout", NAME, "--timeout", "300")
    assert_clean(load.report)
    assert rolled.returncode == 0 and "done: 2/2 workers on the current template" in rolled.stdout, rolled.stderr
    assert "replacing worker-" in rolled.stdout  # its progress, as the operator wrote it
    obj = moe.wait_ready(2)
    after = moe.worker_pods()
    assert len(after) == 2 and not set(before) & set(after), (before, after)
    assert obj["status"]["updatedReplicas"] == 2 and all(w["updated"] for w in obj["status"]["workers"])
    for pod in after:
        args = json.loads(moe.kube.kubectl("get", "pod", pod, "-n", NS, "-o", "jsonpath={.spec.containers[0].args}").stdout)
        assert args[args.index("--compute-threads") + 1] == "2"
    about = f"involvedObject.kind=MoECluster,involvedObject.name={NAME}"
    events = moe.kube.kubectl("get", "events", "-n", NS, "--field-selector", about,
                              "-o", "jsonpath={range .items[*]}{.reason} {end}").stdout.split()
    assert "Updating" in events and "Updated" in events, events

    moe.patch({"updateStrategy": {"type": "OnDelete"}, "worker": {"computeThreads": 1}})
    moe.wait_for(lambda: "OnDelete" in moe.condition("Updating").get("message", ""), "Updating naming OnDelete")
    condition = moe.condition("Updating")
    assert condition["status"] == "True" and condition["message"].startswith("0/2 workers on the current template")
    time.sleep(5)  # a few of the operator's ticks
    assert moe.worker_pods() == after
    moe.patch({"updateStrategy": {"type": "RollingUpdate"}, "worker": {"computeThreads": 2}})  # what they run
    moe.wait_for(lambda: moe.condition("Updating")["status"] == "False", "rollout's end")
    assert moe.worker_pods() == after
    with moe.load() as load:  # maxSurge 2: both workers are replaced at once
        moe.patch({"updateStrategy": {"rollingUpdate": {"maxSurge": 2}}, "worker": {"computeThreads": 3}})
        rolled = kubectl_moe(moe, "rollout", NAME, "--timeout", "300")
    assert_clean(load.report)
    assert rolled.returncode == 0 and re.search(r"replacing worker-\d+, worker-\d+", rolled.stdout), rolled.stdout
    assert not set(after) & set(moe.worker_pods()) and moe.wait_ready(2)["status"]["updatedReplicas"] == 2

    moved = json.loads(manifest(Path("/elsewhere"), 2))
    refused = moe.kube.kubectl("apply", "--dry-run=server", "-f", "-", input=json.dumps(moved), check=False)
    assert refused.returncode != 0 and "model.path cannot change" in refused.stderr, refused.stderr


def test_a_rollout_to_an_image_no_registry_has_stalls_serving_and_setting_it_back_ends_it(moe):
    """The new pod of the first replace waits in ErrImagePull while the old ones serve; the image set back, the
    operator starts that pod again on the current template at once (not after the start timeout), and the replace
    it was part of completes, with no failed request."""
    before = moe.worker_pods()
    with moe.load() as load:
        moe.patch({"image": "moecluster:does-not-exist"})
        new = moe.wait_for(lambda: [p for p in moe.worker_pods() if p not in before], "new worker pod")
        reasons = "jsonpath={.status.containerStatuses[0].state.waiting.reason}"
        moe.wait_for(lambda: moe.kube.kubectl("get", "pod", new[0], "-n", NS, "-o", reasons).stdout == "ErrImagePull",
                     "ErrImagePull")
        time.sleep(3)
        updating = moe.condition("Updating")  # maxSurge 2, from the test above: both at once
        assert updating["status"] == "True" and "on the current template; replacing worker-" in updating["message"]
        workers = {w["pod"]: w for w in moe.get()["status"]["workers"]}
        assert set(before) < set(moe.worker_pods()) and all(workers[p]["experts"] > 0 for p in before), workers
        moe.patch({"image": "moecluster:test"})
        obj = moe.wait_ready(2, timeout=90)  # well within the 120 s a pod has to start
        moe.wait_for(lambda: moe.condition("Updating")["status"] == "False", "rollout's end")
    assert_clean(load.report)
    images = moe.kube.kubectl("get", "pods", "-n", NS, "-l", f"moecluster.io/cluster={NAME}", "-o",
                              "jsonpath={.items[*].spec.containers[0].image}").stdout.split()
    assert set(images) == {"moecluster:test"} and obj["status"]["updatedReplicas"] == 2, images


def test_the_examples_pass_the_api_servers_validation(moe):
    """Every manifest in examples/ against the real API server (the MoECluster CRD's schema, strict field
    validation), as a dry run."""
    result = moe.kube.kubectl("apply", "--dry-run=server", "--validate=strict", "-n", "default", "-f",
                              str(REPO / "examples"))
    for made in ("moecluster.moecluster.io/tiny", "moecluster.moecluster.io/mixtral", "moecluster.moecluster.io/mixtral-train",
                 "job.batch/mixtral-train", "persistentvolumeclaim/moe-snapshots", "horizontalpodautoscaler.autoscaling/"):
        assert made in result.stdout, result.stdout + result.stderr


def test_an_hpa_scales_the_pool_through_the_scale_subresource(moe):
    """The real HPA controller (in kube-controller-manager) raises the pool to its minReplicas.

    No metrics API runs here, so it cannot act on CPU; below minReplicas it scales before reading metrics."""
    hpa = {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": {"name": NAME, "namespace": NS},
           "spec": {"scaleTargetRef": {"apiVersion": "moecluster.io/v1alpha1", "kind": "MoECluster", "name": NAME},
                    "minReplicas": 3, "maxReplicas": 3,
                    "metrics": [{"type": "Resource", "resource": {"name": "cpu",
                                                                  "target": {"type": "Utilization", "averageUtilization": 70}}}]}}
    with moe.load() as load:
        moe.kube.kubectl("apply", "-f", "-", input=json.dumps(hpa))
        try:
            moe.wait_ready(3)
        finally:
            moe.kube.kubectl("delete", "hpa", NAME, "-n", NS)
        moe.kube.kubectl("scale", f"moecluster/{NAME}", "-n", NS, "--replicas=2")
        moe.wait_ready(2)
    assert_clean(load.report)


def test_training_snapshots_a_lost_expert_and_a_restore_on_the_workers_volume(moe, tmp_path):
    """DESIGN rule 6 on Kubernetes. Snapshots live on a volume only the worker pods mount (the operator never
    does): a trainer saves through the operator's controller endpoint, the only copy of some experts comes back
    from the snapshot when its pod is deleted (the rollback reported in status), `kubectl moe restore` rolls the
    pool back, and the trainer resumes from its save exactly."""
    from moecluster.cli.train import batch_for
    from moecluster.sdk.training import ExpertOptimizer, TrainingError, TrainingSession

    snaps, name = tmp_path / "snaps", "trainee"
    snaps.mkdir()
    body = {"apiVersion": "moecluster.io/v1alpha1", "kind": "MoECluster", "metadata": {"name": name, "namespace": NS},
            "spec": {"model": {"path": str(moe.model)}, "replicas": 2, "image": "moecluster:test",
                     "worker": {"threads": 1}, "frontend": {"replicas": 1},
                     "snapshots": {"volume": {"persistentVolumeClaim": {"claimName": "trainee-snapshots"}},
                                   "mountPath": str(snaps)}}}
    moe.kube.kubectl("apply", "-f", "-", input=json.dumps(body))
    get = lambda: json.loads(moe.kube.kubectl("get", "moecluster", name, "-n", NS, "-o", "json").stdout)  # noqa: E731

    def status_when(check, what: str, timeout: float = READY_TIMEOUT_S) -> dict:
        deadline = time.monotonic() + timeout
        while not check(status := get().get("status", {})):
            assert time.monotonic() < deadline, f"{name}: not {what} after {timeout}s: {json.dumps(status)}"
            time.sleep(0.5)
        return status

    def ready(status) -> bool:
        conditions = {c["type"]: c["status"] for c in status.get("conditions", [])}
        return conditions.get("Ready") == "True" and status.get("readyReplicas") == 2

    def train(session, model, opt, steps) -> list[float]:
        losses = []
        for _ in range(steps):
            x = batch_for(session.step - 1, 0, model.config.vocab_size, 2, 8)

            def closure():
                opt.zero_grad()
                loss = model(input_ids=x, labels=x).loss
                loss.backward()
                return loss
            losses.append(opt.step(closure).item())
        return losses

    try:
        status_when(ready, "Ready")
        with TrainingSession(moe.operator.address, cluster=f"{NS}/{name}") as session:
            model = session.model(str(moe.model))
            opt = ExpertOptimizer(model, session, lr=1e-3, weight_decay=0.0)
            first = train(session, model, opt, 3)
            saved = session.save(model, opt)
            first += train(session, model, opt, 2)
        assert saved == snaps / "step-00000003" and (saved / "trainer.pt").is_file()
        status_when(lambda s: [(x["step"], x["trainerState"]) for x in (s.get("training") or {}).get("snapshots", [])]
                    == [(3, True)], "listing the save")  # as a worker lists the volume, which the operator never mounts
        listed = kubectl_moe(moe, "snapshots", name)
        assert listed.returncode == 0 and listed.stdout.split()[:2] == ["step", "3"], listed.stdout + listed.stderr
        assert "+ trainer state" in listed.stdout and str(saved) in listed.stdout

        pod = sorted(moe.kube.kubectl("get", "pods", "-n", NS, "-l", f"moecluster.io/cluster={name},app.kubernetes.io/"
                                      "component=worker", "-o", "jsonpath={.items[*].metadata.name}").stdout.split())[0]
        moe.kube.kubectl("delete", "pod", pod, "-n", NS, "--wait=false")
        status = status_when(lambda s: ready(s) and (s.get("training") or {}).get("rollbacks"), "healed from the snapshot")
        rollbacks = status["training"]["rollbacks"]
        assert {(r["snapshot_step"], r["step"]) for r in rollbacks} == {(3, 5)} and str(saved) in rollbacks[0]["source"]

        restored = kubectl_moe(moe, "restore", name)  # the pool is at step 5 but for what the lost experts missed
        assert restored.returncode == 0 and "every expert back at step 3 (2 updates undone)" in restored.stdout, \
            restored.stdout + restored.stderr
        status_when(lambda s: (s.get("training") or {}).get("step") == 3 and "step 3 from" in s["training"]["restored"],
                    "at step 3", timeout=30)
        with TrainingSession(moe.operator.address, cluster=f"{NS}/{name}", resume_from=saved) as session:
            model = session.model(str(moe.model))
            with pytest.raises(TrainingError, match="make one model"):  # its dense state is in the first (not kept twice)
                session.model(str(moe.model))
            again = train(session, model, ExpertOptimizer(model, session, lr=1e-3, weight_decay=0.0), 2)
        assert all(abs(a - b) <= 1e-4 * abs(b) for a, b in zip(again, first[3:], strict=True)), (again, first)
        snapshot = kubectl_moe(moe, "snapshot", name)  # the pool is at step 5 again
        assert snapshot.returncode == 0 and "snapshot of step 5" in snapshot.stdout, snapshot.stdout + snapshot.stderr
        assert (snaps / "step-00000005" / "manifest.json").is_file()
    finally:
        moe.kube.kubectl("delete", "moecluster", name, "-n", NS, "--wait=true", "--timeout=120s", check=False)


def test_rbac_denies_what_the_operator_must_not_do(moe):
    token = moe.operator.kubeconfig
    can = lambda *a: moe.kube.kubectl("auth", "can-i", *a, kubeconfig=token, check=False).stdout.strip()  # noqa: E731
    assert can("create", "pods", "-n", NS) == "yes" and can("patch", "moeclusters.moecluster.io/status", "-n", NS) == "yes"
    for verb, *what in (("list", "secrets"), ("get", "configmaps"), ("create", "clusterrolebindings"), ("delete", "nodes"),
                        ("create", "pods", "--subresource=exec"), ("delete", "customresourcedefinitions"),
                        ("create", "serviceaccounts", "--subresource=token"),
                        ("update", "moeclusters.moecluster.io", "--subresource=scale")):
        assert can(verb, *what, "-n", NS) == "no", f"the operator may {verb} {' '.join(what)}"
    denied = moe.kube.kubectl("get", "secrets", "-n", NS, kubeconfig=token, check=False)
    assert denied.returncode != 0 and "forbidden" in denied.stderr.lower()


def test_delete_and_helm_uninstall_leave_nothing_behind(moe):
    kube = moe.kube
    kube.kubectl("delete", "moecluster", NAME, "-n", NS, "--timeout=120s")
    deadline = time.monotonic() + 60
    selector = f"moecluster.io/cluster={NAME}"
    while kube.kubectl("get", "pods,services,deployments,replicasets", "-n", NS, "-l", selector, "-o", "name").stdout.strip():
        assert time.monotonic() < deadline, kube.kubectl("get", "all", "-n", NS).stdout
        time.sleep(0.5)
    moe.operator.stop()
    kube.helm("uninstall", RELEASE, "--namespace", SYSTEM_NS, "--wait", "--timeout", "120s")
    kinds = "all,serviceaccounts,roles,rolebindings,clusterroles,clusterrolebindings,networkpolicies,configmaps,secrets"
    left = kube.kubectl("get", kinds, "-A", "-l", f"app.kubernetes.io/instance={RELEASE}", "-o", "name").stdout.strip()
    assert left == "", f"left behind by helm uninstall: {left}"
    releases = kube.kubectl("get", "secrets", "-n", SYSTEM_NS, "-l", "owner=helm", "-o", "name").stdout.strip()
    assert releases == ""
    # Helm never deletes CRDs it installed from crds/ (they may hold other users' resources): documented in the chart.
    assert kube.kubectl("get", "crd", "moeclusters.moecluster.io", check=False).returncode == 0
