"""The fake kube-proxy's listener: one Service clusterIP:port, each connection piped to a Ready pod.

Part of the API-server test harness (`fake_kubelet.py` decides which Services
get one and which pods back them); userspace proxying, as kube-proxy once did.
"""

from __future__ import annotations

import itertools
import logging
import socket
import threading


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
