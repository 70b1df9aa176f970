"""Every gRPC server moecluster starts (controller, operator, worker, frontend).

gRPC sets SO_REUSEPORT on its listening sockets by default, so a second server on a port a first one
holds binds without error and the kernel splits connections between them: a frontend's requests
could land on another cluster's worker. Ours turn it off, so such a collision fails at the bind.
"""

from __future__ import annotations

from concurrent import futures

import grpc

NO_PORT_SHARING = [("grpc.so_reuseport", 0)]


def server(max_workers: int, *, options: list[tuple[str, object]] = (), handlers=None) -> grpc.Server:
    return grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers), handlers=handlers,
                       options=[*options, *NO_PORT_SHARING])
