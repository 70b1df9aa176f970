"""The chart in namespaced mode: Roles in the watched namespaces only, and an operator that sees nothing else.

`operator.watchNamespaces={team-a}`: the operator (with that ServiceAccount's
token, `--namespace team-a`) serves a MoECluster in team-a, leaves one in
team-b alone, and may not even list pods there.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
import torch
from operator_process import Operator

CHART = Path(__file__).resolve().parents[2] / "helm" / "moecluster"
RELEASE, SYSTEM_NS, WATCHED, OTHER = "moens", "moens-system", "team-a", "team-b"


def moecluster(namespace: str, model: Path) -> str:
    return json.dumps({
        "apiVersion": "moecluster.io/v1alpha1", "kind": "MoECluster", "metadata": {"name": "small", "namespace": namespace},
        "spec": {"model": {"path": str(model)}, "replicas": 1, "image": "moecluster:test", "worker": {"threads": 1}},
    })


def status(kube, namespace: str) -> dict:
    return json.loads(kube.kubectl("get", "moecluster", "small", "-n", namespace, "-o", "json").stdout).get("status", {})


@pytest.fixture(scope="module")
def namespaced(kube, tmp_path_factory):
    from moecluster.models.tiny import create_checkpoint

    root = tmp_path_factory.mktemp("namespaced")
    model = create_checkpoint("qwen3_moe", root / "tiny-qwen3", seed=5)
    for namespace in (WATCHED, OTHER):
        kube.create_namespace(namespace)
    kube.helm("install", RELEASE, str(CHART), "--namespace", SYSTEM_NS, "--create-namespace", "--set", "operator.replicas=0",
              "--set", f"operator.watchNamespaces={{{WATCHED}}}", "--wait", "--timeout", "120s")
    sa = kube.kubectl("get", "serviceaccount", "-n", SYSTEM_NS, "-l", f"app.kubernetes.io/instance={RELEASE}",
                      "-o", "jsonpath={.items[0].metadata.name}").stdout.strip()
    operator = Operator(kube.token_kubeconfig(SYSTEM_NS, sa), root / "operator.log")
    operator.start("--namespace", WATCHED)
    try:
        yield kube, operator, model
    finally:
        for namespace in (WATCHED, OTHER):
            kube.kubectl("delete", "moecluster", "small", "-n", namespace, "--ignore-not-found", "--timeout=60s", check=False)
        operator.stop()
        kube.helm("uninstall", RELEASE, "--namespace", SYSTEM_NS, "--wait", check=False)
        print(f"----- operator log (tail) -----\n{operator.log.read_text()[-3000:]}")


def test_serves_in_the_watched_namespace_only(namespaced):
    kube, operator, model = namespaced
    kube.kubectl("apply", "-f", "-", input=moecluster(WATCHED, model))
    kube.kubectl("apply", "-f", "-", input=moecluster(OTHER, model))
    deadline = time.monotonic() + 240
    while not (status(kube, WATCHED).get("readyReplicas") == 1 and
               {c["type"]: c["status"] for c in status(kube, WATCHED).get("conditions", [])}.get("Ready") == "True"):
        assert time.monotonic() < deadline, f"not Ready: {status(kube, WATCHED)}\n{operator.log.read_text()[-3000:]}"
        time.sleep(0.5)
    from moecluster.sdk.client import Client
    from transformers import AutoModelForCausalLM

    ip = kube.kubectl("get", "service", "small", "-n", WATCHED, "-o", "jsonpath={.spec.clusterIP}").stdout.strip()
    ids = torch.randint(0, 100, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()(ids).logits
    deadline = time.monotonic() + 120
    while kube.kubectl("get", "deployment", "small-frontend", "-n", WATCHED, "-o", "jsonpath={.status.readyReplicas}",
                       check=False).stdout.strip() != "1":
        assert time.monotonic() < deadline, "the frontend never became ready"
        time.sleep(0.5)
    with Client(f"{ip}:50051", timeout=60) as client:
        torch.testing.assert_close(client.forward(ids), expected, rtol=0, atol=1e-4)
    # The other namespace's cluster: untouched (no status, no pods, no finalizer), and out of the operator's reach.
    assert status(kube, OTHER) == {}
    other = json.loads(kube.kubectl("get", "moecluster", "small", "-n", OTHER, "-o", "json").stdout)
    assert not other["metadata"].get("finalizers")
    assert kube.kubectl("get", "pods", "-n", OTHER, "-o", "name").stdout.strip() == ""
    denied = kube.kubectl("get", "pods", "-n", OTHER, kubeconfig=operator.kubeconfig, check=False)
    assert denied.returncode != 0 and "forbidden" in denied.stderr.lower()
    cluster_scoped = kube.kubectl("get", "clusterroles,clusterrolebindings", "-l", f"app.kubernetes.io/instance={RELEASE}",
                                  "-o", "name").stdout.strip()
    assert cluster_scoped == ""


def test_a_frontend_behind_tls_and_api_keys_from_secrets(namespaced, tmp_path):
    """frontend.apiKeys and frontend.tls name Secrets: the frontend pods mount them (the fake kubelet writes a
    Secret volume mounted under the temp dir) and serve only a client with a key, over TLS for the Service's name."""
    import grpc
    from moecluster.sdk.client import Client, MoEClusterError
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
    from tls_files import make_ca

    kube, operator, model = namespaced
    ca = make_ca(tmp_path)
    cert, key = ca.issue(tmp_path, "small", [f"small.{WATCHED}.svc"])
    kube.kubectl("create", "secret", "generic", "small-keys", "-n", WATCHED, "--from-literal=api-keys=e2e-key")
    kube.kubectl("create", "secret", "tls", "small-tls", "-n", WATCHED, f"--cert={cert}", f"--key={key}")
    frontend = {"apiKeys": {"secretName": "small-keys", "mountPath": str(tmp_path / "mounted-keys")},
                "tls": {"secretName": "small-tls", "mountPath": str(tmp_path / "mounted-tls")}}
    kube.kubectl("patch", "moecluster", "small", "-n", WATCHED, "--type=merge", "-p",
                 json.dumps({"spec": {"frontend": frontend}}))
    deadline = time.monotonic() + 180
    while True:  # the Deployment rolled: one pod, on the new template, ready, and the old one gone
        deployment = json.loads(kube.kubectl("get", "deployment", "small-frontend", "-n", WATCHED, "-o", "json").stdout)
        args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
        rolled = deployment["status"].get("observedGeneration", 0) >= deployment["metadata"]["generation"]
        counts = [deployment["status"].get(k, 0) for k in ("replicas", "updatedReplicas", "readyReplicas")]
        pods = kube.kubectl("get", "pods", "-n", WATCHED, "-l", "app.kubernetes.io/component=frontend",
                            "-o", "name").stdout.split()
        if "--tls-cert" in args and rolled and counts == [1, 1, 1] and len(pods) == 1:
            break
        assert time.monotonic() < deadline, f"the frontend did not roll: {deployment['status']}"
        time.sleep(0.5)
    assert (tmp_path / "mounted-tls" / "tls.crt").read_bytes() == cert.read_bytes()
    ip = kube.kubectl("get", "service", "small", "-n", WATCHED, "-o", "jsonpath={.spec.clusterIP}").stdout.strip()
    ids = torch.randint(0, 100, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()(ids).logits
    trusted = {"tls": ca.pem, "tls_server_name": f"small.{WATCHED}.svc", "timeout": 60}
    with Client(f"{ip}:50051", api_key="e2e-key", **trusted) as client:
        torch.testing.assert_close(client.forward(ids), expected, rtol=0, atol=1e-4)
    with Client(f"{ip}:50051", api_key="", **trusted) as client, pytest.raises(MoEClusterError) as refused:
        client.forward(ids)
    assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED
