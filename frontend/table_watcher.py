"""Follows the controller's routing table and acknowledges each epoch.

The frontend keeps serving on its last table while the controller is away
(restarting, say) and reconnects on its own; an epoch is acknowledged only
after the dispatcher routes by it, which is what lets the controller drop old
copies safely.
"""

from __future__ import annotations

import logging
import threading

import grpc
from moecluster.frontend.coactivation import RoutingReporter
from moecluster.frontend.dispatcher import Dispatcher
from moecluster.frontend.limit_reporter import LimitReporter
from moecluster.frontend.routing import RoutingTable
from moecluster.frontend.step_gate import StepGate
from moecluster.protos import controller_pb2, controller_pb2_grpc
from moecluster.wire import endpoints, streaming
from moecluster.wire.rate_limits import LimitShares

log = logging.getLogger("moecluster.frontend")
CLUSTER_METADATA_KEY = "moecluster-cluster"  # NAMESPACE/NAME of the MoECluster, where one endpoint serves many


def from_message(message: controller_pb2.RoutingTable) -> RoutingTable:
    return RoutingTable(
        message.epoch, {w.id: w.address for w in message.workers},
        {(p.layer, p.expert): tuple(p.workers) for p in message.placements}, paused=message.paused)


class TableWatcher(threading.Thread):
    def __init__(self, controller: str, dispatcher: Dispatcher, frontend_id: str, retry: float = 0.2,
                 gate: StepGate | None = None, cluster: str = "", shares: LimitShares | None = None):
        """`shares`: this frontend's part of its API-key holders' limits, kept current with the controller."""
        super().__init__(daemon=True, name="table-watch")
        self.controller, self.dispatcher, self.frontend_id, self.retry = controller, dispatcher, frontend_id, retry
        self.metadata = cluster_metadata(cluster)
        self.gate = gate  # a trainer's: acknowledges a paused table only between steps
        self.shares = shares
        self.first_table = threading.Event()
        self.stopped = threading.Event()
        self._call = None

    def run(self) -> None:
        channel = endpoints.internal_channel(self.controller, options=streaming.GRPC_OPTIONS)  # finds a restarted controller fast
        stub = controller_pb2_grpc.ControllerStub(channel)
        reporters = [RoutingReporter(stub, self.dispatcher.coactivation, self.frontend_id, self.metadata)]
        if self.shares is not None:
            reporters.append(LimitReporter(stub, self.shares, self.frontend_id, self.metadata))
        for reporter in reporters:
            reporter.start()
        while not self.stopped.is_set():
            try:
                self._call = stub.WatchRoutingTable(controller_pb2.WatchRequest(
                    frontend_id=self.frontend_id, known_epoch=self.dispatcher.table.epoch, trainer=self.gate is not None),
                    metadata=self.metadata)
                for message in self._call:
                    table = from_message(message)
                    self.dispatcher.update(table)
                    self.first_table.set()
                    ack = _acknowledge(stub, self.frontend_id, self.dispatcher.table.epoch, self.metadata)
                    if self.gate is None:
                        ack()
                    else:
                        self.gate.on_table(table.paused, ack)
            except grpc.RpcError as err:
                if not self.stopped.is_set():
                    log.debug("controller watch broke (%s); retrying", err.code().name)
            except Exception:  # noqa: BLE001 - a bad table must not end the watch: keep the last good one
                log.exception("routing table update failed; keeping epoch %d", self.dispatcher.table.epoch)
            self.stopped.wait(self.retry)
        for reporter in reporters:
            reporter.stopped.set()
            reporter.join(timeout=6)
        channel.close()

    def stop(self) -> None:
        """Ends the watch and tells the controller this frontend is leaving, so that no plan waits a lease
        for it (best effort: a controller out of reach gives it the lease)."""
        self.stopped.set()
        if self._call is not None:
            self._call.cancel()
        if self.first_table.is_set():
            with endpoints.internal_channel(self.controller) as channel:
                try:
                    controller_pb2_grpc.ControllerStub(channel).AckEpoch(controller_pb2.AckRequest(
                        frontend_id=self.frontend_id, leaving=True), timeout=1, metadata=self.metadata)
                except grpc.RpcError as err:
                    log.debug("could not say we are leaving (%s)", err.code().name)


def cluster_metadata(cluster: str) -> tuple[tuple[str, str], ...]:
    """Call metadata naming the cluster, for a controller endpoint that serves several (the Kubernetes operator's)."""
    return ((CLUSTER_METADATA_KEY, cluster),) if cluster else ()


def _acknowledge(stub: controller_pb2_grpc.ControllerStub, frontend_id: str, epoch: int, metadata=()):
    def ack() -> None:
        try:
            stub.AckEpoch(controller_pb2.AckRequest(frontend_id=frontend_id, epoch=epoch), timeout=5, metadata=metadata)
        except grpc.RpcError as err:  # the watch reconnects and acknowledges again
            log.debug("ack of epoch %d failed (%s)", epoch, err.code().name)
    return ack
