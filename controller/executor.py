"""Carries out plan steps: worker RPCs, the backend's start/stop, publishing.

Each step is idempotent, so the control loop may replay a plan after a failure
or a restart. A step that fails raises StepFailed; the loop then observes again
and plans afresh instead of pushing on with a stale plan.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import grpc
from moecluster.controller import plan as p
from moecluster.controller.actuator import Actuator
from moecluster.controller.metrics import ControllerMetrics
from moecluster.controller.monitor import WorkerMonitor
from moecluster.controller.observed import WorkerState
from moecluster.controller.publisher import Publisher
from moecluster.observability.tracing import start_span, tracer
from moecluster.protos import worker_pb2

log = logging.getLogger("moecluster.controller")
_TRACER = tracer(__name__)

COPY_TIMEOUT_S = 300.0


class StepFailed(RuntimeError):
    pass


class Replan(RuntimeError):
    """The world changed under the plan (a worker in the table died): plan again."""


def _keys(experts) -> list[worker_pb2.ExpertKey]:
    return [worker_pb2.ExpertKey(layer=layer, expert=expert) for layer, expert in experts]


class Executor:
    def __init__(self, actuator: Actuator, monitor: WorkerMonitor, publisher: Publisher, metrics: ControllerMetrics,
                 *, start_timeout: float = 120.0, ack_timeout: float = 5.0, progress: Callable[[str], None] = log.info):
        self.actuator, self.monitor, self.publisher, self.metrics = actuator, monitor, publisher, metrics
        self.start_timeout, self.ack_timeout = start_timeout, ack_timeout
        self.progress = progress

    def run(self, steps: list[p.Step]) -> None:
        for step in steps:
            self._check_table_alive(step)
            started = time.perf_counter()
            try:
                with start_span(_TRACER, "controller.step", {"step": type(step).__name__, "key": step.key}):
                    self._run(step)
            except grpc.RpcError as err:
                raise StepFailed(f"{step.key}: {err.code().name}: {err.details()}") from None
            finally:
                self.metrics.step_seconds(type(step).__name__, time.perf_counter() - started)

    def _check_table_alive(self, step: p.Step) -> None:
        observed = self.monitor.snapshot()
        dead = {w for holders in self.publisher.table.placement.values() for w in holders
                if observed.workers.get(w) is None or observed.workers[w].state == WorkerState.DEAD}
        if dead and not isinstance(step, (p.Publish, p.LoadExperts)):  # the steps that heal
            raise Replan(f"workers {sorted(dead)} died; healing first")

    def _run(self, step: p.Step) -> None:
        epoch = self.publisher.table.epoch
        match step:
            case p.StartWorker(worker_id):
                self.progress(f"starting {worker_id}")
                handle = self.actuator.start_worker(worker_id, self.start_timeout)
                self.monitor.add(handle)
            case p.LoadExperts(worker_id, experts):
                self.progress(f"{worker_id}: loading {len(experts)} experts from the checkpoint")
                response = self.monitor.stub(worker_id).LoadExperts(
                    worker_pb2.LoadExpertsRequest(experts=_keys(experts), epoch=epoch), timeout=COPY_TIMEOUT_S)
                self.metrics.bytes_moved("checkpoint", response.bytes_read)
                self.monitor.refresh(worker_id)
            case p.PullExpert(worker_id, expert, source):
                source_address = self.monitor.handle(source).address
                response = self.monitor.stub(worker_id).PullExpert(
                    worker_pb2.PullExpertRequest(expert=_keys([expert])[0], source=source_address, epoch=epoch),
                    timeout=COPY_TIMEOUT_S)
                self.metrics.bytes_moved("peer", response.bytes)
                if response.seconds > 0:
                    self.metrics.migration_seconds(response.seconds)
                self.monitor.refresh(worker_id)
            case p.Publish(placement):
                observed = self.monitor.snapshot()
                addresses = {w: o.address for w, o in observed.workers.items()}
                table = self.publisher.publish(placement, addresses)
                self.metrics.epoch(table.epoch)
                self.progress(f"published epoch {table.epoch}")
            case p.AwaitAcks():
                epoch = self.publisher.table.epoch
                lagging = self.publisher.await_acks(epoch, self.ack_timeout)
                if lagging:
                    log.warning("frontends %s did not acknowledge epoch %d within %.1fs", lagging, epoch,
                                self.ack_timeout)
            case p.DropExperts(worker_id, experts):
                self.monitor.stub(worker_id).DropExperts(
                    worker_pb2.DropExpertsRequest(experts=_keys(experts), epoch=epoch), timeout=30)
                self.monitor.refresh(worker_id)
            case p.DrainWorker(worker_id):
                self.progress(f"draining {worker_id}")
                self.monitor.stub(worker_id).Drain(worker_pb2.DrainRequest(), timeout=10)
            case p.StopWorker(worker_id):
                self.progress(f"stopping {worker_id}")
                self.monitor.remove(worker_id)  # closes our health stream first: it would hold up a graceful stop
                self.actuator.stop_worker(worker_id)
            case _:
                raise TypeError(f"unknown step {step!r}")
