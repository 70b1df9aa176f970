"""Scale-up through Kubernetes vs the local backend, same model, same run.

    python bench/k8s_backend.py [--scalings 2]

Kubernetes here is the API-server test tier (`e2e/apiserver/`): etcd,
kube-apiserver and kube-controller-manager built by `e2e/tools/build.sh`, the
fake kubelet running pods as local processes, the chart installed with helm and
the operator running with its ServiceAccount's token. For each backend: a
cluster of 2 workers (replicas 2) on a tiny qwen3_moe checkpoint, under a
closed-loop load of 2 clients whose every answer is checked against
transformers; then scale to 3 (`kubectl scale`, timed until the resource says
Ready with 3 workers; `moectl scale`, timed until the new layout serves) and
back to 2, `--scalings` times; Kubernetes twice, the second time with
`standbyWorkers: 1` (a spare pod takes the scale-up). Prints the median
scale-up times, their ratios, and the requests answered, failed and wrong.
Bounded: a few minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

# bench/kernels.py would shadow the optional `kernels` package transformers probes for.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "e2e" / "apiserver"))

import subprocess  # noqa: E402

import torch  # noqa: E402
from control_plane import ControlPlane  # noqa: E402
from fake_kubelet import FakeKubelet  # noqa: E402
from moecluster.backends.local import LocalCluster  # noqa: E402
from moecluster.models.tiny import create_checkpoint  # noqa: E402
from moecluster.sdk.load import time_scalings  # noqa: E402
from operator_process import Operator  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402


def measure_local(path, batch, logits, scalings: int) -> dict:
    cluster = LocalCluster("bench-local")
    cluster.up(path, workers=2, replicas=2, port=0)
    try:
        return time_scalings(cluster.status()["endpoint"], batch, logits, lambda n: list(cluster.scale(n)), scalings=scalings)
    finally:
        cluster.down()


class Kubernetes:
    def __init__(self, root: Path):
        out = subprocess.run([str(REPO / "e2e" / "tools" / "build.sh")], capture_output=True, text=True, check=True).stdout
        self.bins = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
        self.plane = ControlPlane(self.bins, root)
        self.plane.start()
        self.kubelet = FakeKubelet(self.plane.api_url, self.plane.ssl_context(), root)
        self.kubelet.start()
        env = {**os.environ, "KUBECONFIG": str(self.plane.kubeconfig)}
        subprocess.run([self.bins["HELM"], "install", "moe", str(REPO / "helm" / "moecluster"), "-n", "moecluster-system",
                        "--create-namespace", "--set", "operator.replicas=0"], env=env, check=True, capture_output=True)
        sa = self.kubectl("get", "sa", "-n", "moecluster-system", "-l", "app.kubernetes.io/instance=moe",
                          "-o", "jsonpath={.items[0].metadata.name}")
        self.operator = Operator(self.plane.token_kubeconfig("moecluster-system", sa), root / "operator.log")
        self.operator.start()

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> str:
        return self.plane.kubectl(*args, input=input, check=check).stdout.strip()

    def ready(self, replicas: int) -> bool:
        obj = json.loads(self.kubectl("get", "moecluster", "bench", "-o", "json"))
        status = obj.get("status", {})
        ready = {c["type"]: c["status"] for c in status.get("conditions", [])}.get("Ready")
        frontend = self.kubectl("get", "deployment", "bench-frontend", "-o", "jsonpath={.status.readyReplicas}", check=False)
        return ready == "True" and status.get("readyReplicas") == replicas and frontend == "1"

    def wait_ready(self, replicas: int, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready(replicas):
            if time.monotonic() > deadline:
                raise TimeoutError(f"not ready with {replicas} workers; operator log:\n{self.operator.log.read_text()[-3000:]}")
            time.sleep(0.1)

    def stop(self) -> None:
        self.operator.stop()
        self.kubelet.stop()
        self.plane.stop()


def measure_kubernetes(root: Path, path, batch, logits, scalings: int) -> dict[str, dict]:
    """Without spares, then with one (`standbyWorkers: 1`), in the same control plane."""
    kube = Kubernetes(root)
    results = {}
    try:
        kube.kubectl("apply", "-f", "-", input=json.dumps({
            "apiVersion": "moecluster.io/v1alpha1", "kind": "MoECluster", "metadata": {"name": "bench", "namespace": "default"},
            "spec": {"model": {"path": str(path)}, "replicas": 2, "minReplicasPerExpert": 2, "image": "bench",
                     "worker": {"threads": 1}}}))
        kube.wait_ready(2)
        address = f"{kube.kubectl('get', 'service', 'bench', '-o', 'jsonpath={.spec.clusterIP}')}:50051"

        def scale(n: int) -> None:
            kube.kubectl("scale", "moecluster/bench", f"--replicas={n}")
            kube.wait_ready(n)

        results["kubernetes"] = time_scalings(address, batch, logits, scale, scalings=scalings)
        kube.kubectl("patch", "moecluster/bench", "--type=merge", "-p", '{"spec": {"standbyWorkers": 1}}')
        deadline = time.monotonic() + 120
        while '"standby"' not in kube.kubectl("get", "moecluster/bench", "-o", "jsonpath={.status.workers}"):
            if time.monotonic() > deadline:
                raise TimeoutError("no standby worker after 120 s")
            time.sleep(0.2)
        results["k8s+spare"] = time_scalings(address, batch, logits, scale, scalings=scalings)
        return results
    finally:
        kube.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scalings", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    root = Path(tempfile.mkdtemp(prefix="moe-bench-k8s-"))
    os.environ["MOECLUSTER_HOME"] = str(root / "home")
    path = create_checkpoint("qwen3_moe", root / "model", seed=0)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    batch = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        logits = model(batch).logits
    results = {"local": measure_local(path, batch, logits, args.scalings),
               **measure_kubernetes(root / "k8s", path, batch, logits, args.scalings)}
    for name, r in results.items():
        print(f"{name:<10} scale 2 -> 3: median {r['scale_up_s']:.2f} s (each: {', '.join(f'{t:.2f}' for t in r['all'])}); "
              f"{r['ok']} requests answered, {r['failed']} failed, {r['wrong']} wrong")
    local = results["local"]["scale_up_s"]
    print(f"scale-up time vs local: kubernetes {results['kubernetes']['scale_up_s'] / local:.1f}x, "
          f"with a standby spare {results['k8s+spare']['scale_up_s'] / local:.1f}x")


if __name__ == "__main__":
    main()
