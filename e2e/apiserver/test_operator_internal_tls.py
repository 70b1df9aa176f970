"""Mutual TLS inside a cluster on Kubernetes: `spec.internalTLS` and the chart's `operator.internalTLS`.

The operator holds certificates of one CA (MOECLUSTER_INTERNAL_TLS, as the chart's Deployment mounts them);
a MoECluster names a Secret of the same CA, which its worker and frontend pods mount. The cluster then
serves and scales with every internal call mutually authenticated: a worker refuses a caller without a
certificate, and a MoECluster that asks for no TLS is refused by such an operator with a message.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import grpc
import pytest
import torch
from operator_process import Operator

CHART = Path(__file__).resolve().parents[2] / "helm" / "moecluster"
RELEASE, SYSTEM_NS, NS = "moetls", "moetls-system", "tls-a"


def status(kube, name: str) -> dict:
    return json.loads(kube.kubectl("get", "moecluster", name, "-n", NS, "-o", "json").stdout).get("status", {})


def secret_from(kube, namespace: str, name: str, folder: Path) -> None:
    kube.kubectl("create", "secret", "generic", name, "-n", namespace,
                 *(f"--from-file={f}={folder / f}" for f in ("ca.crt", "tls.crt", "tls.key")))


@pytest.fixture(scope="module")
def mtls(kube, tmp_path_factory):
    from moecluster.models.tiny import create_checkpoint
    from moecluster.wire import internal_tls

    root = tmp_path_factory.mktemp("internal-tls")
    model = create_checkpoint("qwen3_moe", root / "tiny-qwen3", seed=6)
    certs = internal_tls.generate(root / "certs", "e2e")  # what cert-manager would issue from one CA
    kube.create_namespace(NS)
    kube.create_namespace(SYSTEM_NS)
    secret_from(kube, SYSTEM_NS, "ops-internal", certs)
    secret_from(kube, NS, "small-internal", certs)
    kube.helm("install", RELEASE, str(CHART), "--namespace", SYSTEM_NS, "--set", "operator.replicas=0",
              "--set", f"operator.watchNamespaces={{{NS}}}", "--set", "operator.internalTLS.secretName=ops-internal",
              "--wait", "--timeout", "120s")
    sa = kube.kubectl("get", "serviceaccount", "-n", SYSTEM_NS, "-l", f"app.kubernetes.io/instance={RELEASE}",
                      "-o", "jsonpath={.items[0].metadata.name}").stdout.strip()
    operator = Operator(kube.token_kubeconfig(SYSTEM_NS, sa), root / "operator.log",
                        env={internal_tls.ENV: str(certs)})  # as the chart's Deployment mounts ops-internal
    operator.start("--namespace", NS)
    try:
        yield kube, operator, model, certs, root
    finally:
        for name in ("small", "plain"):
            kube.kubectl("delete", "moecluster", name, "-n", NS, "--ignore-not-found", "--timeout=60s", check=False)
        operator.stop()
        kube.helm("uninstall", RELEASE, "--namespace", SYSTEM_NS, "--wait", check=False)
        print(f"----- operator log (tail) -----\n{operator.log.read_text()[-3000:]}")


def test_the_chart_mounts_the_operators_certificates(mtls):
    kube = mtls[0]
    deployment = json.loads(kube.kubectl("get", "deployment", "-n", SYSTEM_NS, "-l", f"app.kubernetes.io/instance={RELEASE}",
                                         "-o", "json").stdout)["items"][0]["spec"]["template"]["spec"]
    container = deployment["containers"][0]
    assert {"name": "MOECLUSTER_INTERNAL_TLS", "value": "/etc/moecluster/internal-tls"} in container["env"]
    mount = next(m for m in container["volumeMounts"] if m["name"] == "internal-tls")
    assert mount["mountPath"] == "/etc/moecluster/internal-tls" and mount["readOnly"]
    assert {"name": "internal-tls", "secret": {"secretName": "ops-internal", "defaultMode": 420}} in deployment["volumes"]


def test_a_cluster_with_internal_tls_serves_and_scales_and_its_workers_refuse_plaintext(mtls):
    from moecluster.protos import worker_pb2, worker_pb2_grpc
    from moecluster.sdk.client import Client
    from moecluster.wire import endpoints
    from transformers import AutoModelForCausalLM

    kube, operator, model, certs, root = mtls
    kube.kubectl("apply", "-f", "-", input=json.dumps({
        "apiVersion": "moecluster.io/v1alpha1", "kind": "MoECluster", "metadata": {"name": "small", "namespace": NS},
        "spec": {"model": {"path": str(model)}, "replicas": 1, "image": "moecluster:test", "worker": {"threads": 1},
                 "internalTLS": {"secretName": "small-internal", "mountPath": str(root / "mounted")}}}))

    def wait_ready(replicas: int) -> None:
        deadline = time.monotonic() + 240
        while not (status(kube, "small").get("readyReplicas") == replicas and {
                c["type"]: c["status"] for c in status(kube, "small").get("conditions", [])}.get("Ready") == "True"):
            assert time.monotonic() < deadline, f"not Ready: {status(kube, 'small')}\n{operator.log.read_text()[-3000:]}"
            time.sleep(0.5)
        while kube.kubectl("get", "deployment", "small-frontend", "-n", NS, "-o", "jsonpath={.status.readyReplicas}",
                           check=False).stdout.strip() != "1":
            assert time.monotonic() < deadline, "the frontend never became ready"
            time.sleep(0.5)

    wait_ready(1)
    ip = kube.kubectl("get", "service", "small", "-n", NS, "-o", "jsonpath={.spec.clusterIP}").stdout.strip()
    ids = torch.randint(0, 100, (1, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()(ids).logits
    with Client(f"{ip}:50051", timeout=60) as client:  # users: the frontend's public port, no certificate
        torch.testing.assert_close(client.forward(ids), expected, rtol=0, atol=1e-4)

    kube.kubectl("scale", "moecluster", "small", "-n", NS, "--replicas=2")
    wait_ready(2)  # a worker started, experts copied to it over mutual TLS
    with Client(f"{ip}:50051", timeout=60) as client:
        torch.testing.assert_close(client.forward(ids), expected, rtol=0, atol=1e-4)

    pods = json.loads(kube.kubectl("get", "pods", "-n", NS, "-l", "app.kubernetes.io/component=worker",
                                   "-o", "json").stdout)["items"]
    assert len(pods) == 2
    for pod in pods:
        container = pod["spec"]["containers"][0]
        assert "tcpSocket" in container["readinessProbe"], "the kubelet's gRPC probe cannot speak TLS"
        address = f"{pod['status']['podIP']}:50061"
        with grpc.insecure_channel(address) as channel, pytest.raises(grpc.RpcError) as refused:
            worker_pb2_grpc.ExpertWorkerStub(channel).Stats(worker_pb2.StatsRequest(), timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, f"{pod['metadata']['name']} answered plaintext"
        with endpoints.internal_channel(address, tls_folder=certs) as channel:
            held = worker_pb2_grpc.ExpertWorkerStub(channel).Stats(worker_pb2.StatsRequest(), timeout=10).held
        assert held, f"{pod['metadata']['name']} holds no experts"


def test_a_cluster_without_internal_tls_is_refused_by_an_operator_that_has_it(mtls):
    kube, operator, model, _, _ = mtls
    kube.kubectl("apply", "-f", "-", input=json.dumps({
        "apiVersion": "moecluster.io/v1alpha1", "kind": "MoECluster", "metadata": {"name": "plain", "namespace": NS},
        "spec": {"model": {"path": str(model)}, "replicas": 1, "image": "moecluster:test"}}))
    deadline = time.monotonic() + 60
    while "set spec.internalTLS" not in json.dumps(status(kube, "plain")):
        assert time.monotonic() < deadline, f"no refusal in {status(kube, 'plain')}\n{operator.log.read_text()[-2000:]}"
        time.sleep(0.5)
    assert kube.kubectl("get", "pods", "-n", NS, "-l", "moecluster.io/cluster=plain", "-o", "name").stdout.strip() == ""
