"""The MoECluster that test_operator.py's tests share, and what they reach it through."""

from __future__ import annotations

import json
import time
from pathlib import Path

NS, NAME = "ml", "tiny"
READY_TIMEOUT_S = 300


def manifest(model: Path, replicas: int) -> str:
    return json.dumps({
        "apiVersion": "moecluster.io/v1alpha1", "kind": "MoECluster", "metadata": {"name": NAME, "namespace": NS},
        "spec": {"model": {"path": str(model)}, "replicas": replicas, "minReplicasPerExpert": 2,
                 "image": "moecluster:test", "worker": {"threads": 1, "computeThreads": 1},
                 "frontend": {"replicas": 1, "generateCacheTokens": 64, "forwardBatchTokens": 128}},
    })


class Handle:
    def __init__(self, kube, operator, model, batch, expected, sa):
        self.kube, self.operator, self.model, self.batch, self.expected, self.sa = kube, operator, model, batch, expected, sa

    def get(self) -> dict:
        return json.loads(self.kube.kubectl("get", "moecluster", NAME, "-n", NS, "-o", "json").stdout)

    def patch(self, spec: dict) -> None:
        self.kube.kubectl("patch", "moecluster", NAME, "-n", NS, "--type=merge", "-p", json.dumps({"spec": spec}))

    def condition(self, kind: str) -> dict:
        return {c["type"]: c for c in self.get()["status"]["conditions"]}[kind]

    def wait_for(self, check, what: str, timeout: float = 60.0):
        """`check()`'s first true answer, polled; TimeoutError saying `what` was awaited."""
        deadline = time.monotonic() + timeout
        while not (answer := check()):
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {what} after {timeout}s\noperator log:\n{self.operator.log.read_text()[-3000:]}")
            time.sleep(0.5)
        return answer

    def wait_ready(self, replicas: int, timeout: float = READY_TIMEOUT_S, since_epoch: int = -1) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            obj = self.get()
            status = obj.get("status", {})
            ready = {c["type"]: c["status"] for c in status.get("conditions", [])}.get("Ready")
            if (ready == "True" and status.get("readyReplicas") == replicas and obj["spec"]["replicas"] == replicas
                    and status.get("replicas") == replicas and status.get("epoch", 0) > since_epoch
                    and self.frontend_ready()):
                return obj
            if time.monotonic() > deadline:
                raise TimeoutError(f"{NAME} not Ready with {replicas} workers after {timeout}s: {json.dumps(status)}\n"
                                   f"operator log:\n{self.operator.log.read_text()[-4000:]}")
            time.sleep(0.5)

    def frontend_ready(self) -> bool:
        result = self.kube.kubectl("get", "deployment", f"{NAME}-frontend", "-n", NS, "-o",
                                   "jsonpath={.status.readyReplicas}", check=False)
        return result.returncode == 0 and result.stdout.strip() == "1"

    def address(self) -> str:
        ip = self.kube.kubectl("get", "service", NAME, "-n", NS, "-o", "jsonpath={.spec.clusterIP}").stdout.strip()
        return f"{ip}:50051"

    def worker_pods(self) -> list[str]:
        out = self.kube.kubectl("get", "pods", "-n", NS, "-l", f"moecluster.io/cluster={NAME},app.kubernetes.io/component=worker",
                                "-o", "jsonpath={.items[*].metadata.name}").stdout
        return sorted(out.split())

    def load(self):
        from moecluster.sdk.load import ClosedLoopLoad

        return ClosedLoopLoad(self.address(), self.batch, self.expected, clients=2, max_seconds=400)


def assert_clean(report) -> None:
    assert report.ok > 0, "no request succeeded under load"
    assert (report.failed, report.wrong) == (0, 0), f"failed {report.failed}, wrong {report.wrong}: {report.errors[:3]}"
