"""The fake kube-proxy: a listener on each Service's clusterIP:port, each connection piped to a Ready pod.

Part of the API-server test harness (`fake_kubelet.py` runs the pods and hands
over the Services it lists); userspace proxying, as kube-proxy once did.
"""

from __future__ import annotations

import itertools
import logging
import socket
import threading
from collections.abc import Callable

from pod_run import PodRun, container_port


class ServiceListener:
    """One clusterIP:port: accepts connections and pipes each to a backend chosen at accept time."""

    def __init__(self, address: tuple[str, int], service: dict, port_spec: dict, backends, log: logging.Logger) -> None:
        self.address, self.service, self.port_spec, self._backends, self.log = address, service, port_spec, backends, log
        self._counter = itertools.count()
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(address)
        self._sock.listen(64)
        self._sock.settimeout(0.5)
        self._closed = threading.Event()
        threading.Thread(target=self._accept_loop, name=f"proxy-{address[0]}:{address[1]}", daemon=True).start()
        log.info("proxy listening on %s:%d", *address)

    def close(self) -> None:
        self._closed.set()
        self._sock.close()
        self.log.info("proxy on %s:%d closed", *self.address)

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # closed
            try:
                backends = self._backends(self.service, self.port_spec)
            except Exception:
                self.log.exception("choosing a backend for %s:%d", *self.address)
                backends = []
            if not backends:
                conn.close()
                continue
            backend = backends[next(self._counter) % len(backends)]
            threading.Thread(target=self._connect, args=(conn, backend), daemon=True).start()

    def _connect(self, conn: socket.socket, backend: tuple[str, int]) -> None:
        try:
            upstream = socket.create_connection(backend, timeout=2)
        except OSError:
            conn.close()
            return
        upstream.settimeout(None)
        conn.settimeout(None)
        other = threading.Thread(target=_pipe, args=(upstream, conn), daemon=True)
        other.start()
        _pipe(conn, upstream)
        other.join()
        conn.close()
        upstream.close()


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    """Copy src to dst until EOF, then half-close dst. On an error shut both, which also ends the other direction."""
    try:
        while data := src.recv(65536):
            dst.sendall(data)
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class KubeProxy:
    """Keeps one ServiceListener per TCP port of every Service with a clusterIP in 127/8."""

    def __init__(self, api_address: tuple[str, int], ready_runs: Callable[[], list[PodRun]], log: logging.Logger) -> None:
        self.api_address, self._ready_runs, self.log = api_address, ready_runs, log
        self._listeners: dict[tuple[str, int], ServiceListener] = {}

    def sync(self, services: list[dict]) -> None:
        desired: dict[tuple[str, int], tuple[dict, dict]] = {}
        for svc in services:
            spec = svc["spec"]
            ip = spec.get("clusterIP") or ""
            if not ip.startswith("127.") or spec.get("type", "ClusterIP") not in ("ClusterIP", "NodePort", "LoadBalancer"):
                continue
            for port in spec.get("ports") or []:
                if port.get("protocol", "TCP") == "TCP":
                    desired[(ip, port["port"])] = (svc, port)
        for key in [k for k in self._listeners if k not in desired]:
            self._listeners.pop(key).close()
        for key, (svc, port) in desired.items():
            listener = self._listeners.get(key)
            if listener is not None:
                listener.service, listener.port_spec = svc, port
                continue
            try:
                self._listeners[key] = ServiceListener(key, svc, port, self._backends, self.log)
            except OSError as e:
                self.log.warning("cannot listen on %s:%d for service %s/%s: %s", *key, svc["metadata"]["namespace"],
                                 svc["metadata"]["name"], e)

    def close(self) -> None:
        for listener in list(self._listeners.values()):
            listener.close()
        self._listeners.clear()

    def _backends(self, svc: dict, port_spec: dict) -> list[tuple[str, int]]:
        meta, selector = svc["metadata"], svc["spec"].get("selector")
        if (meta["namespace"], meta["name"]) == ("default", "kubernetes"):
            return [self.api_address]
        if not selector:
            return []
        backends = []
        target = port_spec.get("targetPort", port_spec["port"])
        for run in self._ready_runs():
            labels = run.pod["metadata"].get("labels") or {}
            if run.namespace != meta["namespace"] or any(labels.get(k) != v for k, v in selector.items()):
                continue
            port = container_port(target, run.pod["spec"].get("containers", []))
            if port is not None:
                backends.append((run.ip, port))
        return backends
