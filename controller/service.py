"""`moecluster.controller.v1.Controller` over gRPC: a thin shell around the runtime."""

from __future__ import annotations

import math
import threading

import grpc
from moecluster.controller.publisher import Table
from moecluster.controller.runtime import Controller, Refused
from moecluster.protos import controller_pb2, controller_pb2_grpc
from moecluster.workers.snapshot_folders import Snapshot
from pydantic import ValidationError


def table_message(table: Table) -> controller_pb2.RoutingTable:
    return controller_pb2.RoutingTable(
        epoch=table.epoch,
        workers=[controller_pb2.WorkerAddress(id=w, address=a) for w, a in sorted(table.addresses.items())],
        placements=[controller_pb2.Placement(layer=l, expert=e, workers=list(h))
                    for (l, e), h in sorted(table.placement.items())],
        paused=table.paused,
    )


class ControllerService(controller_pb2_grpc.ControllerServicer):
    def __init__(self, controller: Controller, on_shutdown=lambda: None):
        self.controller = controller
        self.on_shutdown = on_shutdown

    def Status(self, request, context):
        s = self.controller.status(list_snapshots=request.list_snapshots)
        return controller_pb2.StatusResponse(
            name=s["name"], endpoint=s["endpoint"], epoch=s["epoch"], desired_workers=s["desired_workers"],
            min_replicas=s["min_replicas"], converged=s["converged"], last_error=s["last_error"],
            imbalance=s["imbalance"], frontends=s["frontends"], step=s["step"], snapshot=s["snapshot"],
            restored=s["restored"], lowest_step=s["lowest_step"], trainers=s["trainers"],
            rollbacks=[controller_pb2.Rollback(**r) for r in s["rollbacks"]],
            snapshots=[controller_pb2.SnapshotInfo(**snap) for snap in s["snapshots"]],
            colocate=s["colocate"], colocated=-1.0 if s["colocated"] is None else s["colocated"],
            layer_imbalance=s["layer_imbalance"],
            workers=[controller_pb2.WorkerInfo(id=w["id"], address=w["address"], pid=w["pid"], state=w["state"],
                                               experts=[v for k in w["experts"] for v in k], load=w["load"],
                                               device=w["device"])
                     for w in s["workers"]])

    def Scale(self, request, context):
        yield from self._progress(context, lambda: self.controller.scale(request.workers))

    def Drain(self, request, context):
        yield from self._progress(context, lambda: self.controller.drain(request.worker, replace=request.replace))

    def Migrate(self, request, context):
        yield from self._progress(context, lambda: self.controller.migrate(
            (request.layer, request.expert), request.to_worker, request.from_worker or None))

    def Snapshot(self, request, context):
        if request.check_only:
            yield from self._progress(context, lambda: self.controller.check_snapshot_dir(request.directory))
        else:
            yield from self._progress(context, lambda: self.controller.snapshot(request.directory))

    def Restore(self, request, context):
        yield from self._progress(context, lambda: self.controller.restore(request.snapshot, request.session))

    def WatchRoutingTable(self, request, context):
        if not request.frontend_id:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "frontend_id: empty; every frontend names itself")
        publisher = self.controller.publisher
        if request.known_epoch >= publisher.table.epoch and publisher.table.placement:
            # A restarted controller may be behind a frontend: move past what it has seen.
            table = publisher.table
            publisher.publish(table.placement, table.addresses, min_epoch=request.known_epoch + 1, paused=table.paused)
        for table in publisher.watch(request.frontend_id, request.known_epoch, context.is_active, request.trainer):
            yield table_message(table)

    def AckEpoch(self, request, context):
        if request.leaving:
            self.controller.publisher.leave(request.frontend_id)
        else:
            self.controller.publisher.ack(request.frontend_id, request.epoch)
        return controller_pb2.AckResponse()

    def ReportRouting(self, request, context):
        try:
            tokens = _reported_pairs(request, set(self.controller.monitor.experts))
        except ValueError as err:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        self.controller.pair_rates.add(request.frontend_id, request.seconds, tokens)
        return controller_pb2.RoutingReportAck()

    def ShareLimits(self, request, context):
        if len(request.holders) != len(request.calls) or not request.frontend_id:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a limit demand names its frontend and one count per holder")
        parts, others = self.controller.limit_shares.report(request.frontend_id, dict(zip(request.holders, request.calls)))
        return controller_pb2.LimitShares(holders=list(parts), shares=list(parts.values()), others=others)

    def Shutdown(self, request, context):
        threading.Thread(target=self.on_shutdown, daemon=True).start()
        return controller_pb2.ShutdownResponse()

    def _progress(self, context, run):
        """Streams a runtime generator's lines; a Snapshot it ends with names the last message's path."""
        path = ""
        try:
            for item in run():
                if isinstance(item, Snapshot):
                    path = str(item.path)
                    continue
                yield controller_pb2.Progress(message=item, epoch=self.controller.publisher.table.epoch)
            yield controller_pb2.Progress(message="done", done=True, epoch=self.controller.publisher.table.epoch,
                                          path=path)
        except (ValueError, ValidationError) as err:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, _one_line(err))
        except Refused as err:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(err))
        except TimeoutError as err:
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, str(err))
        except RuntimeError as err:  # a step that failed (a worker died mid-snapshot, trainers never paused)
            context.abort(grpc.StatusCode.ABORTED, str(err))


def _reported_pairs(request: controller_pb2.RoutingReport, experts: set) -> dict:
    """{((layer, a), (layer, b)): tokens} from a routing report; ValueError naming what is wrong."""
    if not (math.isfinite(request.seconds) and request.seconds >= 0):
        raise ValueError(f"seconds must be a finite number >= 0, got {request.seconds}")
    out = {}
    for p in request.layers:
        if not len(p.first) == len(p.second) == len(p.tokens):
            raise ValueError(f"layer {p.layer}: first, second and tokens differ in length "
                             f"({len(p.first)}, {len(p.second)}, {len(p.tokens)})")
        for a, b, t in zip(p.first, p.second, p.tokens):
            if (p.layer, a) not in experts or (p.layer, b) not in experts:
                raise ValueError(f"pair ({a}, {b}) of layer {p.layer}: the model has no such expert")
            if not (math.isfinite(t) and t >= 0):
                raise ValueError(f"pair ({a}, {b}) of layer {p.layer}: tokens must be a finite number >= 0, got {t}")
            out[((p.layer, a), (p.layer, b)) if a < b else ((p.layer, b), (p.layer, a))] = t
    return out


def _one_line(err: Exception) -> str:
    if isinstance(err, ValidationError):
        return "; ".join(e["msg"].removeprefix("Value error, ") for e in err.errors())
    return str(err)
