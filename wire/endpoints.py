"""How moecluster's gRPC servers listen and its long-lived channels reconnect.

Servers: gRPC sets SO_REUSEPORT on its listening sockets by default, so a second server on a port a
first one holds binds without error and the kernel splits connections between them: a frontend's
requests could land on another cluster's worker. Ours turn it off, so such a collision fails at the bind.

Channels to a peer that restarts (a frontend, the controller): gRPC waits 1 s, growing to 120 s, between
attempts to reconnect, so a peer back after 5 s is found again only seconds later. Ours try every
100 ms growing to 1 s. gRPC reads `grpc.min_reconnect_backoff_ms` as the least time one attempt (TCP,
then TLS and HTTP/2 handshakes) is given: at 100 ms, a busy peer or a TLS handshake across machines
failed calls with UNAVAILABLE while the peer was up, so ours give an attempt CONNECT_TIMEOUT_MS.

Between a cluster's own parts, `internal_channel` and `listen` speak mutual TLS when the process has the
cluster's certificates (`internal_tls.py`), plaintext otherwise.
"""

from __future__ import annotations

import os
from concurrent import futures

import grpc
from moecluster.wire import internal_tls

NO_PORT_SHARING = [("grpc.so_reuseport", 0)]
CONNECT_TIMEOUT_MS = 5000
FAST_RECONNECT = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 1000),
                  ("grpc.min_reconnect_backoff_ms", CONNECT_TIMEOUT_MS)]


def server(max_workers: int, *, options: list[tuple[str, object]] = (), handlers=None,
           interceptors: list[grpc.ServerInterceptor] = ()) -> grpc.Server:
    return grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers), handlers=handlers,
                       interceptors=list(interceptors), options=[*options, *NO_PORT_SHARING])


def channel(address: str, *, options: list[tuple[str, object]] = (),
            credentials: grpc.ChannelCredentials | None = None) -> grpc.Channel:
    """Plaintext, or TLS with `credentials` (wire/access.py)."""
    if credentials is not None:
        return grpc.secure_channel(address, credentials, options=[*options, *FAST_RECONNECT])
    return grpc.insecure_channel(address, options=[*options, *FAST_RECONNECT])


def internal_channel(address: str, *, options: list[tuple[str, object]] = (),
                     tls_folder: str | os.PathLike | None = None) -> grpc.Channel:
    """A channel to another part of the cluster (controller, worker): mutual TLS with the certificates in
    `tls_folder`, else $MOECLUSTER_INTERNAL_TLS's, else plaintext."""
    path = internal_tls.folder(tls_folder)
    if path is None:
        return channel(address, options=options)
    credentials, tls_options = internal_tls.channel_credentials(path)
    return channel(address, options=[*options, *tls_options], credentials=credentials)


def listen(server: grpc.Server, address: str) -> int:
    """Binds a cluster-internal server to `address`: requiring the cluster's client certificates when this process
    has them (`internal_tls.py`). The port bound; 0 (or RuntimeError, by gRPC version) when it could not bind."""
    path = internal_tls.folder()
    if path is None:
        return server.add_insecure_port(address)
    return server.add_secure_port(address, internal_tls.server_credentials(path))
