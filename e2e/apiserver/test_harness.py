"""The harness itself: a real API server with RBAC, KCM controllers, and the fake kubelet running pods."""

from __future__ import annotations

import json
import os
import time
import urllib.request
import uuid

import pytest

HTTP_SERVER = {"command": ["python", "-m", "http.server"], "args": ["--bind", "$(POD_IP)", "8080"],
               "env": [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
               "ports": [{"name": "http", "containerPort": 8080}],
               "readinessProbe": {"tcpSocket": {"port": "http"}, "periodSeconds": 1}}


@pytest.fixture
def ns(kube):
    name = f"harness-{uuid.uuid4().hex[:8]}"
    kube.create_namespace(name)
    yield name
    kube.kubectl("delete", "namespace", name, "--wait=false", check=False)


def apply(kube, obj: dict) -> None:
    kube.kubectl("apply", "-f", "-", input=json.dumps(obj))


def get(kube, ns: str, kind: str, name: str) -> dict:
    return json.loads(kube.kubectl("get", kind, name, "-n", ns, "-o", "json").stdout)


def pod(name: str, container: dict, **spec) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": {"app": name}},
            "spec": {"containers": [{"name": "main", "image": "ignored", **container}], **spec}}


def wait_ready(kube, ns: str, what: str, timeout: int = 60) -> None:
    kube.kubectl("wait", "--for=condition=Ready", what, "-n", ns, f"--timeout={timeout}s", timeout=timeout + 10)


def http_get(url: str) -> int:
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(url, timeout=5) as response:
        return response.status


def test_node_is_ready_and_leased(kube):
    # A new Node is created with the not-ready taint (TaintNodesByCondition); the controller manager's
    # node lifecycle controller lifts it once it sees Ready: this test may run a moment after registration.
    deadline = time.monotonic() + 30
    while True:
        node = json.loads(kube.kubectl("get", "node", "fake-node", "-o", "json").stdout)
        taints = [t["key"] for t in node["spec"].get("taints", [])]
        if not taints or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    conditions = {c["type"]: c["status"] for c in node["status"]["conditions"]}
    assert conditions["Ready"] == "True"
    assert node["status"]["allocatable"]["cpu"] == "16"
    assert not taints, taints
    lease = json.loads(kube.kubectl("get", "lease", "fake-node", "-n", "kube-node-lease", "-o", "json").stdout)
    assert lease["spec"]["holderIdentity"] == "fake-node"


def test_bare_pod_runs_with_a_loopback_ip(kube, ns):
    apply(kube, {**pod("web", HTTP_SERVER), "metadata": {"name": "web", "namespace": ns}})
    wait_ready(kube, ns, "pod/web")
    status = get(kube, ns, "pod", "web")["status"]
    assert status["phase"] == "Running"
    assert status["podIP"].startswith("127.0.0.") and status["podIP"] != "127.0.0.1"
    assert status["podIP"] == kube.harness.pod_ip(ns, "web")
    assert status["containerStatuses"][0]["ready"] is True
    assert http_get(f"http://{status['podIP']}:8080/") == 200
    # The process got $(POD_IP) expanded: it listens on the pod's address only.
    assert f"Serving HTTP on {status['podIP']} port 8080" in kube.harness.log_path(ns, "web").read_text()


def test_deployment_behind_a_cluster_ip_service(kube, ns):
    template = pod("web", HTTP_SERVER)
    apply(kube, {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web", "namespace": ns},
                 "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "web"}}, "template": {
                     "metadata": template["metadata"], "spec": template["spec"]}}})
    apply(kube, {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": ns},
                 "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": "http"}]}})
    kube.kubectl("rollout", "status", "deployment/web", "-n", ns, "--timeout=60s", timeout=70)
    pods = json.loads(kube.kubectl("get", "pods", "-n", ns, "-l", "app=web", "-o", "json").stdout)["items"]
    assert len(pods) == 2 and len({p["status"]["podIP"] for p in pods}) == 2
    cluster_ip = get(kube, ns, "service", "web")["spec"]["clusterIP"]
    assert cluster_ip.startswith("127.16.")
    deadline = time.monotonic() + 10  # the proxy picks up new Services within a tick
    while True:
        try:
            assert [http_get(f"http://{cluster_ip}/") for _ in range(4)] == [200] * 4
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_killed_process_is_restarted_and_deleted_pod_is_killed(kube, ns):
    sleeper = {"command": ["python", "-c", "import time; time.sleep(600)"]}
    apply(kube, {**pod("sleeper", sleeper), "metadata": {"name": "sleeper", "namespace": ns}})
    wait_ready(kube, ns, "pod/sleeper")
    first = kube.harness.process_pid(ns, "sleeper")
    assert first
    os.kill(first, 9)
    deadline = time.monotonic() + 30
    while True:
        restarts = get(kube, ns, "pod", "sleeper")["status"]["containerStatuses"][0]["restartCount"]
        pid = kube.harness.process_pid(ns, "sleeper")
        if restarts == 1 and pid and pid != first:
            break
        assert time.monotonic() < deadline, f"no restart: restartCount={restarts} pid={pid}"
        time.sleep(0.2)
    kube.kubectl("delete", "pod", "sleeper", "-n", ns, "--timeout=30s", timeout=40)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_rbac_is_enforced(kube, ns):
    kube.kubectl("create", "serviceaccount", "nobody", "-n", ns)
    config = kube.token_kubeconfig(ns, "nobody")
    assert kube.kubectl("auth", "whoami", "-o", "jsonpath={.status.userInfo.username}", kubeconfig=config).stdout \
        == f"system:serviceaccount:{ns}:nobody"
    result = kube.kubectl("get", "pods", "-n", ns, kubeconfig=config, check=False)
    assert result.returncode != 0 and "forbidden" in result.stderr.lower(), result.stderr
    kube.kubectl("create", "rolebinding", "view", "--clusterrole=view", f"--serviceaccount={ns}:nobody", "-n", ns)
    deadline = time.monotonic() + 10
    while kube.kubectl("get", "pods", "-n", ns, kubeconfig=config, check=False).returncode != 0:
        assert time.monotonic() < deadline, "a RoleBinding to view did not grant list pods"
        time.sleep(0.2)


def test_pod_with_restart_policy_never_fails(kube, ns):
    crash = {"command": ["python", "-c", "import sys; print('bye'); sys.exit(3)"]}
    apply(kube, {**pod("crash", crash, restartPolicy="Never"), "metadata": {"name": "crash", "namespace": ns}})
    kube.kubectl("wait", "--for=jsonpath={.status.phase}=Failed", "pod/crash", "-n", ns, "--timeout=30s", timeout=40)
    status = get(kube, ns, "pod", "crash")["status"]["containerStatuses"][0]
    assert status["state"]["terminated"]["exitCode"] == 3 and status["restartCount"] == 0
    assert kube.harness.log_path(ns, "crash").read_text() == "bye\n"

