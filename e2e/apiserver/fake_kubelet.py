"""A fake kubelet (plus scheduler and kube-proxy) for one node, so pods "run" as local processes.

What it fakes, for the node ``fake-node`` against a real kube-apiserver:

- kubelet, node side: registers the Node (cpu 16, memory 64Gi, pods 110, Ready),
  renews its Lease in ``kube-node-lease`` every 5 s and its status heartbeat
  every 10 s, so the node lifecycle controller never marks it NotReady.
- scheduler: binds every pod with no ``spec.nodeName`` (and schedulerName unset
  or ``default-scheduler``) to fake-node, ignoring taints, affinity and resources.
- kubelet, pod side, for every pod bound to fake-node:
  - gives it its own address 127.0.0.N (N from 2 up; freed when the pod ends);
  - runs each container's ``command`` + ``args`` as a host process in its own
    process group (the image is ignored, but one whose name holds
    ``does-not-exist`` waits with reason ``ErrImagePull``, as one no registry
    has; no ``command`` = the container waits forever with reason ``NoCommand``). ``python``/``python3`` as the command
    means ``sys.executable``; the venv's bin directory is first on PATH.
    ``$(VAR)`` in command, args and env values is expanded as Kubernetes does;
  - env: the harness's own environment minus proxy variables, then ``envFrom``
    and ``env`` (``value``; ``valueFrom`` fieldRef for metadata.name/namespace/
    uid/labels/annotations, spec.nodeName/serviceAccountName, status.podIP(s)/
    hostIP(s); configMapKeyRef/secretKeyRef; resourceFieldRef gives the raw
    limit/request or the node's capacity);
  - stdout+stderr of each container go to ``log_path(ns, pod, container)``
    (appended across restarts); the working directory is ``workingDir`` if it
    exists, else a per-pod temp dir;
  - status: phase, podIP(s), hostIP 127.0.0.1, containerStatuses (running /
    waiting / terminated, ready, restartCount, lastState), conditions
    PodScheduled/Initialized/ContainersReady/Ready;
  - readiness: ``tcpSocket``, ``httpGet`` and ``grpc`` readiness probes are all a
    TCP connect to podIP:port (named ports resolved from containerPorts), every
    tick (~0.2 s), with no thresholds or initial delay; ``exec`` probes and no
    probe = ready once started;
  - exits: restartPolicy Always/OnFailure restarts the container (restartCount+1,
    backoff 0.5 s doubling to 5 s, reason CrashLoopBackOff meanwhile); Never ends
    the pod as Succeeded/Failed;
  - deletion: SIGTERM to the process group, SIGKILL after the grace period
    (capped at 10 s), then deletes the pod with grace period 0 as a kubelet
    does. A pod that vanished from the API has its processes SIGKILLed.
- kube-proxy: listens on clusterIP:port (TCP) of every Service with a ClusterIP
  in 127/8 and forwards each connection to one Ready pod matching the selector
  (targetPort by number or name; round robin per connection). No Ready pod: the
  connection is closed. ``default/kubernetes`` forwards to the API server.
  Endpoints/EndpointSlices are not used: the proxy selects pods itself.

What it does not fake: containers, images, init and ephemeral containers (not
run), sidecars, volumes (not mounted: processes see the host filesystem as is; Secret volumes
mounted under the temp dir are written there, `pod_volumes.py`),
resources, cgroups, securityContext, liveness/startup probes, hostPorts,
NodePorts, UDP/SCTP, DNS, ``kubectl logs/exec/port-forward`` (there is no
kubelet API), CNI and NetworkPolicy.

Everything the loop does is logged to ``<work_dir>/fake-kubelet.log``; the loop
survives API errors (retries with backoff).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from api_client import Api, ApiError
from container_env import container_env, expand
from fake_proxy import KubeProxy
from pod_run import ContainerRun, PodRun, container_port, now, pod_status
from pod_volumes import write_secret_volumes

NODE_NAME = "fake-node"
HOST_IP = "127.0.0.1"
CAPACITY = {"cpu": "16", "memory": "64Gi", "pods": "110", "ephemeral-storage": "100Gi"}
GRACE_CAP_S = 10.0
UNPULLABLE = "does-not-exist"  # in an image name: the image cannot be pulled
_PROXY_VARS = {"http_proxy", "https_proxy", "all_proxy", "no_proxy", "ftp_proxy"}


def _now_micro() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class FakeKubelet:
    """See the module docstring. ``start()`` registers the node and starts the threads; ``stop()`` ends all."""

    def __init__(self, api_url: str, context: ssl.SSLContext, work_dir: Path, *, node_name: str = NODE_NAME,
                 ip_prefix: str = "127.0.0.", tick_s: float = 0.2) -> None:
        self.api = Api(api_url, context)
        self.api_address = (self.api.host, self.api.port)
        self.node_name, self.ip_prefix, self.tick_s = node_name, ip_prefix, tick_s
        self.work_dir = Path(work_dir)
        self.pods_dir = self.work_dir / "pods"
        self.pods_dir.mkdir(parents=True, exist_ok=True)
        self.log = logging.getLogger(f"fake_kubelet.{id(self)}")
        self.log.propagate = False
        self.log.setLevel(logging.INFO)
        handler = logging.FileHandler(self.work_dir / "fake-kubelet.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(threadName)s %(levelname)s %(message)s"))
        self.log.addHandler(handler)
        self._runs: dict[str, PodRun] = {}  # by pod uid
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._ips_in_use: set[str] = set()
        self._finalize_attempts: dict[str, float] = {}  # pod uid -> when we last deleted it with grace 0
        self._proxy = KubeProxy(self.api_address, self._ready_runs, self.log)
        self._node_since = now()
        base = {k: v for k, v in os.environ.items() if k.lower() not in _PROXY_VARS}
        base["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), base.get("PATH", "")])
        self._base_env = base

    # --- public -------------------------------------------------------------------------------------

    def start(self) -> None:
        self._register_node()
        for target, name in ((self._heartbeat_loop, "heartbeat"), (self._main_loop, "pods")):
            thread = threading.Thread(target=target, name=f"fake-kubelet-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=10)
        with self._lock:
            runs = list(self._runs.values())
            self._runs.clear()
        for run in runs:
            self._signal(run, signal.SIGTERM)
        deadline = time.monotonic() + 3
        for run in runs:
            for c in run.containers.values():
                if c.proc is not None:
                    try:
                        c.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
                    except subprocess.TimeoutExpired:
                        pass
            self._kill(run)
        self._proxy.close()

    def _ready_runs(self) -> list[PodRun]:
        with self._lock:
            return [run for run in self._runs.values() if run.ready]

    def _run_for(self, namespace: str, name: str) -> PodRun | None:
        with self._lock:
            matches = [r for r in self._runs.values() if r.namespace == namespace and r.name == name]
        return matches[-1] if matches else None

    def pod_ip(self, namespace: str, name: str) -> str | None:
        run = self._run_for(namespace, name)
        return run.ip if run else None

    def process_pid(self, namespace: str, name: str, container: str | None = None) -> int | None:
        """The pid (= process group id) of a pod's running container process; None if not running."""
        run = self._run_for(namespace, name)
        if run is None:
            return None
        c = run.containers.get(container) if container else next(iter(run.containers.values()), None)
        proc = c.proc if c else None
        return proc.pid if proc is not None else None

    def log_path(self, namespace: str, name: str, container: str | None = None) -> Path:
        """Where a container's stdout+stderr go (the first container's when container is None)."""
        run = self._run_for(namespace, name)
        if run is not None and container is None and run.containers:
            container = next(iter(run.containers))
        return self.pods_dir / f"{namespace}_{name}_{container or 'unknown'}.log"

    def log_paths(self) -> list[Path]:
        return sorted(self.pods_dir.glob("*.log"))

    # --- node ---------------------------------------------------------------------------------------

    def _node_status(self) -> dict:
        beat = now()
        conditions = [
            {"type": t, "status": s, "reason": r, "message": f"fake kubelet: {r}", "lastHeartbeatTime": beat,
             "lastTransitionTime": self._node_since}
            for t, s, r in (("MemoryPressure", "False", "KubeletHasSufficientMemory"),
                            ("DiskPressure", "False", "KubeletHasNoDiskPressure"),
                            ("PIDPressure", "False", "KubeletHasSufficientPID"),
                            ("Ready", "True", "KubeletReady"))]
        return {
            "capacity": CAPACITY, "allocatable": CAPACITY, "conditions": conditions,
            "addresses": [{"type": "InternalIP", "address": HOST_IP}, {"type": "Hostname", "address": self.node_name}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
            "nodeInfo": {"machineID": "fake", "systemUUID": "fake", "bootID": "fake", "kernelVersion": os.uname().release,
                         "osImage": "fake-kubelet", "containerRuntimeVersion": "fake://1", "kubeletVersion": "v1.34.4",
                         "kubeProxyVersion": "", "operatingSystem": "linux", "architecture": "amd64"},
        }

    def _register_node(self) -> None:
        node = {"apiVersion": "v1", "kind": "Node",
                "metadata": {"name": self.node_name,
                             "labels": {"kubernetes.io/hostname": self.node_name, "kubernetes.io/os": "linux",
                                        "kubernetes.io/arch": "amd64", "type": "fake-kubelet"}},
                "spec": {}, "status": self._node_status()}
        try:
            self.api.request("POST", "/api/v1/nodes", node)
        except ApiError as e:
            if e.status != 409:
                raise
        self._heartbeat()

    def _heartbeat(self) -> None:
        self.api.request("PATCH", f"/api/v1/nodes/{self.node_name}/status", {"status": self._node_status()},
                         "application/merge-patch+json")

    def _renew_lease(self) -> None:
        path = f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{self.node_name}"
        spec = {"holderIdentity": self.node_name, "leaseDurationSeconds": 40, "renewTime": _now_micro()}
        try:
            self.api.request("PATCH", path, {"spec": spec}, "application/merge-patch+json")
        except ApiError as e:
            if e.status != 404:
                raise
            self.api.request("POST", "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases",
                             {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                              "metadata": {"name": self.node_name}, "spec": spec})

    def _heartbeat_loop(self) -> None:
        last_status = time.monotonic()
        while not self._stop.is_set():
            try:
                self._renew_lease()
                if time.monotonic() - last_status >= 10:
                    self._heartbeat()
                    last_status = time.monotonic()
            except Exception:
                self.log.exception("heartbeat failed")
            self._stop.wait(5)

    # --- pods ---------------------------------------------------------------------------------------

    def _main_loop(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                self._tick()
                failures = 0
            except Exception:
                failures += 1
                self.log.exception("tick failed (%d in a row)", failures)
            self._stop.wait(min(5.0, self.tick_s * 2 ** min(failures, 5)))

    def _tick(self) -> None:
        pods = self.api.request("GET", "/api/v1/pods")["items"]
        seen = set()
        for pod in pods:
            spec, meta = pod["spec"], pod["metadata"]
            node = spec.get("nodeName")
            if not node:
                if (not meta.get("deletionTimestamp") and spec.get("schedulerName", "default-scheduler") == "default-scheduler"
                        and pod.get("status", {}).get("phase", "Pending") == "Pending"):
                    self._bind(pod)
                continue
            if node != self.node_name:
                continue
            seen.add(meta["uid"])
            try:
                self._sync_pod(pod)
            except Exception:
                self.log.exception("sync of pod %s/%s failed", meta["namespace"], meta["name"])
        self._finalize_attempts = {uid: t for uid, t in self._finalize_attempts.items() if uid in seen}
        with self._lock:
            gone = [run for uid, run in self._runs.items() if uid not in seen]
        for run in gone:
            self.log.info("pod %s/%s (%s) vanished from the API: killing it", run.namespace, run.name, run.uid)
            self._kill(run)
            with self._lock:
                self._runs.pop(run.uid, None)
        self._proxy.sync(self.api.request("GET", "/api/v1/services")["items"])

    def _bind(self, pod: dict) -> None:
        meta = pod["metadata"]
        body = {"apiVersion": "v1", "kind": "Binding", "metadata": {"name": meta["name"], "uid": meta["uid"]},
                "target": {"apiVersion": "v1", "kind": "Node", "name": self.node_name}}
        try:
            self.api.request("POST", f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}/binding", body)
            self.log.info("bound %s/%s to %s", meta["namespace"], meta["name"], self.node_name)
        except ApiError as e:
            self.log.warning("binding %s/%s failed: %s", meta["namespace"], meta["name"], e)

    def _allocate_ip(self) -> str:
        with self._lock:
            for n in range(2, 255):
                ip = f"{self.ip_prefix}{n}"
                if ip not in self._ips_in_use:
                    self._ips_in_use.add(ip)
                    return ip
        raise RuntimeError("fake kubelet: all 253 pod IPs are in use")

    def _release_ip(self, run: PodRun) -> None:
        with self._lock:
            if not run.ip_released:
                run.ip_released = True
                self._ips_in_use.discard(run.ip)

    def _sync_pod(self, pod: dict) -> None:
        meta, spec = pod["metadata"], pod["spec"]
        uid, deleting = meta["uid"], meta.get("deletionTimestamp")
        with self._lock:
            run = self._runs.get(uid)
        if run is None:
            if deleting:
                self._finalize(pod)
                return
            if pod.get("status", {}).get("phase") in ("Succeeded", "Failed"):
                return  # ended before we knew it (a restarted harness): nothing to run
            run = PodRun(uid=uid, namespace=meta["namespace"], name=meta["name"], ip=self._allocate_ip(), pod=pod,
                          dir=Path(tempfile.mkdtemp(prefix=f"{meta['namespace']}_{meta['name']}_", dir=self.pods_dir)),
                          start_time=now())
            for c in spec.get("containers", []):
                run.containers[c["name"]] = ContainerRun(
                    spec=c, log_path=self.pods_dir / f"{run.namespace}_{run.name}_{c['name']}.log")
            with self._lock:
                self._runs[uid] = run
            self.log.info("pod %s/%s (%s) gets %s", run.namespace, run.name, uid, run.ip)
        run.pod = pod
        if deleting:
            self._terminate_step(run)
            return
        for c in run.containers.values():
            self._step_container(run, c)
        if all(c.done for c in run.containers.values()):
            self._release_ip(run)
        self._report(run)

    def _step_container(self, run: PodRun, c: ContainerRun) -> None:
        moment = time.monotonic()
        if c.proc is not None:
            code = c.proc.poll()
            if code is None:
                c.ready = self._probe(run, c)
                return
            self.log.info("container %s/%s/%s (pid %d) exited with %d", run.namespace, run.name, c.spec["name"],
                          c.proc.pid, code)
            self._exited(run, c, code, "Completed" if code == 0 else "Error")
            return
        if not c.done and moment >= c.next_start:
            self._start_container(run, c)

    def _exited(self, run: PodRun, c: ContainerRun, code: int, reason: str, message: str = "") -> None:
        c.last_terminated = {"exitCode": code, "reason": reason, "startedAt": c.started_at or now(), "finishedAt": now()}
        if message:
            c.last_terminated["message"] = message
        c.proc, c.ready = None, False
        policy = run.pod["spec"].get("restartPolicy", "Always")
        if policy == "Always" or (policy == "OnFailure" and code != 0):
            c.next_start = time.monotonic() + min(5.0, 0.5 * 2 ** c.restart_count)
            c.waiting = ("CrashLoopBackOff", f"fake kubelet: restarting after exit code {code}")
        else:
            c.done = True

    def _start_container(self, run: PodRun, c: ContainerRun) -> None:
        spec = c.spec
        try:
            env = container_env(self.api, run.pod, run.ip, spec, node_name=self.node_name, host_ip=HOST_IP, capacity=CAPACITY)
            write_secret_volumes(self.api, run.pod, spec)
        except Exception as e:  # a missing ConfigMap/Secret key: as a kubelet, retry later
            c.waiting, c.next_start = ("CreateContainerConfigError", str(e)), time.monotonic() + 1
            return
        argv = [expand(a, env) for a in (spec.get("command") or []) + (spec.get("args") or [])]
        if UNPULLABLE in spec.get("image", ""):
            c.waiting = ("ErrImagePull", f"fake kubelet: {spec['image']} is not in any registry (its name says so)")
            c.next_start = time.monotonic() + 1
            return
        if not spec.get("command"):
            c.waiting = ("NoCommand", "fake kubelet: images are ignored, so a container needs a command")
            c.next_start = time.monotonic() + 5
            return
        if argv[0] in ("python", "python3"):
            argv[0] = sys.executable
        working_dir = spec.get("workingDir")
        cwd = working_dir if working_dir and os.path.isdir(working_dir) else run.dir
        if c.started_once:
            c.restart_count += 1
        c.started_once, c.started_at = True, now()
        try:
            with open(c.log_path, "ab") as log:
                c.proc = subprocess.Popen(argv, env={**self._base_env, **env}, cwd=cwd, stdout=log,
                                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        except OSError as e:
            self.log.warning("container %s/%s/%s cannot start %s: %s", run.namespace, run.name, spec["name"], argv, e)
            self._exited(run, c, 128, "StartError", str(e))
            return
        c.waiting = ("", "")
        self.log.info("container %s/%s/%s started as pid %d: %s", run.namespace, run.name, spec["name"], c.proc.pid, argv)

    def _probe(self, run: PodRun, c: ContainerRun) -> bool:
        probe = c.spec.get("readinessProbe")
        if not probe:
            return True
        for kind in ("tcpSocket", "httpGet", "grpc"):
            if kind in probe:
                port = container_port(probe[kind].get("port"), [c.spec])
                if port is None:
                    return False
                try:
                    with socket.create_connection((run.ip, port), timeout=0.5):
                        return True
                except OSError:
                    return False
        return True  # exec probes are not run

    def _report(self, run: PodRun) -> None:
        status = pod_status(run, HOST_IP)
        encoded = json.dumps(status, sort_keys=True)
        if encoded == run.last_status:
            return
        try:
            self.api.request("PATCH", f"/api/v1/namespaces/{run.namespace}/pods/{run.name}/status",
                             {"metadata": {"uid": run.uid}, "status": status}, "application/merge-patch+json")
            run.last_status = encoded
        except ApiError as e:
            if e.status != 404:
                self.log.warning("status of %s/%s: %s", run.namespace, run.name, e)

    # --- termination --------------------------------------------------------------------------------

    def _signal(self, run: PodRun, sig: int) -> None:
        for c in run.containers.values():
            if c.started_once and c.proc is not None:
                try:
                    os.killpg(c.proc.pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass

    def _kill(self, run: PodRun) -> None:
        """SIGKILL every container's process group and reap the leaders."""
        for c in run.containers.values():
            if c.proc is None:
                continue
            try:
                os.killpg(c.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                c.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.log.error("pid %d survived SIGKILL for 5 s", c.proc.pid)
            c.proc, c.ready = None, False
        self._release_ip(run)

    def _terminate_step(self, run: PodRun) -> None:
        if run.finalized:
            self._finalize(run.pod)  # still listed: the delete did not land yet (rate-limited)
            return
        if run.kill_deadline is None:
            meta, spec = run.pod["metadata"], run.pod["spec"]
            grace = meta.get("deletionGracePeriodSeconds")
            grace = spec.get("terminationGracePeriodSeconds", 30) if grace is None else grace
            run.kill_deadline = time.monotonic() + min(float(grace), GRACE_CAP_S)
            self.log.info("pod %s/%s deleted: SIGTERM, grace %.0f s", run.namespace, run.name, min(grace, GRACE_CAP_S))
            self._signal(run, signal.SIGTERM)
        alive = [c for c in run.containers.values() if c.proc is not None and c.proc.poll() is None]
        if alive and time.monotonic() < run.kill_deadline:
            return
        self._kill(run)
        run.finalized = True
        self._finalize(run.pod)

    def _finalize(self, pod: dict) -> None:
        """Delete the pod with grace period 0, at most every 2 s per pod (it may linger with finalizers)."""
        meta = pod["metadata"]
        last = self._finalize_attempts.get(meta["uid"])
        if last is not None and time.monotonic() - last < 2:
            return
        self._finalize_attempts[meta["uid"]] = time.monotonic()
        body = {"apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": 0, "preconditions": {"uid": meta["uid"]}}
        try:
            self.api.request("DELETE", f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}", body)
            self.log.info("pod %s/%s finalized", meta["namespace"], meta["name"])
        except ApiError as e:
            if e.status not in (404, 409):
                self.log.warning("deleting %s/%s: %s", meta["namespace"], meta["name"], e)
