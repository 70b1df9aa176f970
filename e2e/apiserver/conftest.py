"""Session fixture ``kube``: a real control plane on loopback plus the fake kubelet (see README.md).

Skipped when Go is missing (the binaries are built from source) or MOECLUSTER_SKIP_APISERVER=1.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from control_plane import CommandFailed, ControlPlane, tail  # noqa: E402
from fake_kubelet import FakeKubelet  # noqa: E402

BUILD_SH = Path(__file__).resolve().parents[1] / "tools" / "build.sh"
REQUIRED = ("ETCD", "KUBE_APISERVER", "KUBE_CONTROLLER_MANAGER", "KUBECTL", "PROMQL_CHECK")
FIRST_BUILD_TIMEOUT_S = 3600


class Kube:
    """What tests get: the admin kubeconfig, kubectl/helm runners, the fake kubelet, logs."""

    def __init__(self, plane: ControlPlane, harness: FakeKubelet, bins: dict[str, str], log_dir: Path,
                 startup_s: float) -> None:
        self.plane, self.harness, self.bins, self.log_dir = plane, harness, bins, log_dir
        self.kubeconfig = plane.kubeconfig
        self.api_url = plane.api_url
        self.startup_s = startup_s

    def kubectl(self, *args: str, check: bool = True, input: str | None = None,
                kubeconfig: str | os.PathLike | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
        return self.plane.kubectl(*args, check=check, input=input, kubeconfig=kubeconfig, timeout=timeout)

    def helm(self, *args: str, check: bool = True, input: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
        helm = self.bins.get("HELM")
        if not helm or not os.access(helm, os.X_OK):
            raise RuntimeError(f"helm is not built ({helm}): see the output of {BUILD_SH}")
        home = self.log_dir / "helm"
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig), "HELM_CACHE_HOME": str(home / "cache"),
               "HELM_CONFIG_HOME": str(home / "config"), "HELM_DATA_HOME": str(home / "data")}
        argv = [helm, *args]
        result = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout, env=env)
        if check and result.returncode != 0:
            raise CommandFailed(result.returncode, argv, result.stdout, result.stderr)
        return result

    def token_kubeconfig(self, namespace: str, serviceaccount: str) -> Path:
        return self.plane.token_kubeconfig(namespace, serviceaccount)

    def create_namespace(self, name: str, timeout: float = 30) -> None:
        """Create a namespace and wait for its `default` ServiceAccount (pods are refused until KCM makes it)."""
        self.kubectl("create", "namespace", name)
        deadline = time.monotonic() + timeout
        while self.kubectl("get", "serviceaccount", "default", "-n", name, check=False).returncode != 0:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no ServiceAccount default in namespace {name} after {timeout} s")
            time.sleep(0.2)

    def dump(self, lines: int = 40) -> str:
        """`kubectl get all,events -A` and the tails of the control-plane, fake-kubelet and pod logs."""
        parts = []
        for args in (("get", "nodes,all", "-A", "-o", "wide"), ("get", "events", "-A", "--sort-by=.lastTimestamp")):
            try:
                result = self.kubectl(*args, check=False, timeout=20)
                parts.append(f"----- kubectl {' '.join(args)} -----\n{result.stdout}{result.stderr}")
            except Exception as e:
                parts.append(f"----- kubectl {' '.join(args)}: {e}")
        parts.append(self.plane.tails(lines=lines))
        for path in [self.log_dir / "fake-kubelet.log", *self.harness.log_paths()]:
            parts.append(f"----- {path} (last {lines} lines) -----\n{tail(path, lines)}")
        return "\n".join(parts)


def _skip_reason() -> str | None:
    if os.environ.get("MOECLUSTER_SKIP_APISERVER") == "1":
        return "MOECLUSTER_SKIP_APISERVER=1"
    if shutil.which("go") is None:
        return ("Go is not installed: install Go 1.22+ and rerun; e2e/tools/build.sh builds kube-apiserver, etcd, "
                "helm, kubectl from source")
    return None


def _build() -> dict[str, str]:
    try:
        result = subprocess.run([str(BUILD_SH)], capture_output=True, text=True, timeout=FIRST_BUILD_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{BUILD_SH} timed out after {FIRST_BUILD_TIMEOUT_S} s:\n{(e.stderr or b'')[-4000:]}", pytrace=False)
    output = result.stdout + result.stderr
    if result.returncode != 0:
        pytest.fail(f"{BUILD_SH} failed with exit code {result.returncode}:\n{output[-4000:]}", pytrace=False)
    bins = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
    missing = [name for name in REQUIRED if not os.access(bins.get(name, ""), os.X_OK)]
    if missing:
        pytest.fail(f"{BUILD_SH} did not produce {missing}:\n{output[-4000:]}", pytrace=False)
    return bins


@pytest.fixture(scope="session")
def kube(tmp_path_factory):
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    started = time.monotonic()
    bins = _build()
    log_dir = tmp_path_factory.mktemp("apiserver")  # pytest keeps the last few runs' logs, no more
    plane = ControlPlane(bins, log_dir)
    harness = None
    try:
        plane.start()
        harness = FakeKubelet(plane.api_url, plane.ssl_context(), log_dir)
        harness.start()
        kube = Kube(plane, harness, bins, log_dir, time.monotonic() - started)
        sys.stderr.write(f"\n[kube] control plane up in {kube.startup_s:.1f} s; logs in {log_dir}\n")
        yield kube
    except Exception as e:
        pytest.fail(f"control plane did not start: {e}\n{plane.tails()}", pytrace=False)
    finally:
        if harness is not None:
            harness.stop()
        plane.stop()


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """The first test that starts `kube` may have to build Kubernetes first: give it the build's time too."""
    here = Path(__file__).resolve().parent
    for item in items:
        if "kube" in getattr(item, "fixturenames", ()) and here in Path(item.path).resolve().parents:
            marker = item.get_closest_marker("timeout")
            base = marker.args[0] if marker and marker.args else 300
            item.add_marker(pytest.mark.timeout(base + FIRST_BUILD_TIMEOUT_S), append=False)
            return


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed and "kube" in getattr(item, "funcargs", {}):
        try:
            report.sections.append(("kube dump", item.funcargs["kube"].dump()))
        except Exception as e:  # never hide the test's own failure
            report.sections.append(("kube dump", f"dump failed: {e}"))
    return report
