"""One gRPC endpoint for many controllers: the Kubernetes operator runs one per `MoECluster`.

A call names its cluster in the `moecluster-cluster` metadata (`NAMESPACE/NAME`,
sent by `frontend --cluster`); the router hands it to that cluster's
`ControllerService`. Frontends then dial a single stable address, the
operator's Service, whatever cluster they belong to.
"""

from __future__ import annotations

import threading

import grpc
from moecluster.frontend.table_watcher import CLUSTER_METADATA_KEY
from moecluster.protos import controller_pb2_grpc


class _Handlers:
    """Collects what `add_ControllerServicer_to_server` registers, in place of a server."""

    def __init__(self):
        self.generic: list[grpc.GenericRpcHandler] = []

    def add_generic_rpc_handlers(self, handlers) -> None:
        self.generic.extend(handlers)

    def add_registered_method_handlers(self, service_name, method_handlers) -> None:
        pass  # the generic handlers cover the same methods

    def find(self, details: grpc.HandlerCallDetails):
        for handler in self.generic:
            found = handler.service(details)
            if found is not None:
                return found
        return None


class ControllerRouter(grpc.GenericRpcHandler):
    def __init__(self):
        self._lock = threading.Lock()
        self._clusters: dict[str, _Handlers] = {}

    def register(self, cluster: str, servicer: controller_pb2_grpc.ControllerServicer) -> None:
        handlers = _Handlers()
        controller_pb2_grpc.add_ControllerServicer_to_server(servicer, handlers)
        with self._lock:
            self._clusters[cluster] = handlers

    def unregister(self, cluster: str) -> None:
        with self._lock:
            self._clusters.pop(cluster, None)

    def clusters(self) -> list[str]:
        with self._lock:
            return sorted(self._clusters)

    def service(self, handler_call_details: grpc.HandlerCallDetails):
        cluster = dict(handler_call_details.invocation_metadata or ()).get(CLUSTER_METADATA_KEY, "")
        with self._lock:
            handlers = self._clusters.get(cluster)
        # Unknown cluster: UNIMPLEMENTED, and the frontend's watch retries until the operator has started it.
        return handlers.find(handler_call_details) if handlers is not None else None
