"""Carries out plan steps: worker RPCs, the backend's start/stop, publishing.

Each step is idempotent, so the control loop may replay a plan after a failure
or a restart. A step that fails raises StepFailed; the loop then observes again
and plans afresh instead of pushing on with a stale plan.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator

import grpc
from moecluster.controller import plan as p
from moecluster.controller import remote_snapshots
from moecluster.controller.actuator import Actuator
from moecluster.controller.metrics import ControllerMetrics
from moecluster.controller.monitor import WorkerMonitor
from moecluster.controller.observed import WorkerState
from moecluster.controller.publisher import Publisher
from moecluster.observability.tracing import start_span, tracer
from moecluster.protos import worker_pb2
from moecluster.workers.snapshot_folders import Snapshot, from_message

log = logging.getLogger("moecluster.controller")
_TRACER = tracer(__name__)

COPY_TIMEOUT_S = 300.0
WATCH_EVERY_S = 0.1  # how often a long worker call looks whether a worker it involves was declared dead


class StepFailed(RuntimeError):
    pass


class Replan(RuntimeError):
    """The world changed under the plan (a worker in the table died): plan again."""


def watched(monitor: WorkerMonitor, call, request, timeout: float, *workers: str):
    """`call(request)` (a worker RPC), abandoned with Replan once the monitor declares one of `workers` dead. A
    worker that hangs (SIGSTOP, a stuck GPU) misses heartbeats within a second, but would hold a copy into or
    out of it, and with it the control loop, for the call's whole deadline."""
    future = call.future(request, timeout=timeout)
    while True:
        try:
            return future.result(timeout=WATCH_EVERY_S)
        except grpc.FutureTimeoutError:
            dead = monitor.dead(workers)
            if dead:
                future.cancel()
                raise Replan(f"workers {dead} stopped answering during a call to {workers[0]}; healing first") from None


def partly(touched: bool) -> str:
    return "; the pool is partly restored (experts at different steps): restore again" if touched else ""


def _keys(experts) -> list[worker_pb2.ExpertKey]:
    return [worker_pb2.ExpertKey(layer=layer, expert=expert) for layer, expert in experts]


class Executor:
    def __init__(self, actuator: Actuator, monitor: WorkerMonitor, publisher: Publisher, metrics: ControllerMetrics,
                 *, start_timeout: float = 120.0, ack_timeout: float = 5.0, pause_timeout: float = 300.0,
                 snapshot_dir: str | None = None, progress: Callable[[str], None] = log.info):
        self.actuator, self.monitor, self.publisher, self.metrics = actuator, monitor, publisher, metrics
        self.start_timeout, self.ack_timeout, self.pause_timeout = start_timeout, ack_timeout, pause_timeout
        self.snapshot_dir = snapshot_dir
        self.progress = progress
        self.rollbacks: list[dict] = []  # experts restored to an older step than the pool's: reported, never hidden

    def run(self, steps: list[p.Step]) -> None:
        with self.paused(any(isinstance(s, p.COPIES) for s in steps)):
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

    @contextlib.contextmanager
    def paused(self, needed: bool = True):
        """Trainers at a step boundary for the block (expert state is copied only between steps).
        The table is paused even when no trainer watches, so one that connects during the block starts
        no step until it ends; those watching once it is published are waited for. The plan's next
        Publish (or the block's end) lifts it."""
        trainers = []
        if needed and self.publisher.table.placement:  # before the first table no trainer can step
            table = self.publisher.publish(self.publisher.table.placement, self.publisher.table.addresses, paused=True)
            trainers = self.publisher.trainers()
        if trainers:
            self.progress(f"pausing trainers {trainers} at their step boundary (epoch {table.epoch})")
            started = time.perf_counter()
            # only the trainers: a frontend's ack does not make a copy safe, and a hung one (or a data-parallel
            # member, whose group's leader holds the gate for it) would hold the pause for pause_timeout
            lagging = self.publisher.await_acks(table.epoch, self.pause_timeout, among=trainers)
            if lagging:
                self._resume()
                raise StepFailed(f"trainers {lagging} did not reach a step boundary within {self.pause_timeout:.0f}s")
            self.metrics.step_seconds("PauseTrainers", time.perf_counter() - started)
        try:
            yield
        finally:
            if self.publisher.table.paused:
                self._resume()

    def _resume(self) -> None:
        table = self.publisher.table
        self.publisher.publish(table.placement, table.addresses)

    def _check_table_alive(self, step: p.Step) -> None:
        observed = self.monitor.snapshot()
        dead = {w for holders in self.publisher.table.placement.values() for w in holders
                if observed.workers.get(w) is None or observed.workers[w].state == WorkerState.DEAD}
        if dead and not isinstance(step, (p.Publish, p.LoadExperts, p.RestoreExperts)):  # the steps that heal
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
                response = watched(self.monitor, self.monitor.stub(worker_id).LoadExperts,
                                   worker_pb2.LoadExpertsRequest(experts=_keys(experts), epoch=epoch), COPY_TIMEOUT_S,
                                   worker_id)
                self.metrics.bytes_moved("checkpoint", response.bytes_read)
                self.monitor.refresh(worker_id)
            case p.RestoreExperts(worker_id, experts, step_now):
                self._restore(worker_id, experts, step_now, epoch)
                self.monitor.refresh(worker_id)
            case p.PullExpert(worker_id, expert, source, refresh):
                source_address = self.monitor.handle(source).address
                response = watched(self.monitor, self.monitor.stub(worker_id).PullExpert,
                                   worker_pb2.PullExpertRequest(expert=_keys([expert])[0], source=source_address,
                                                                epoch=epoch, refresh=refresh), COPY_TIMEOUT_S,
                                   worker_id, source)
                if refresh and response.bytes:
                    self.metrics.replica_resynced()
                    log.warning("%s missed a training update of expert %s: copied the newer state from %s",
                                worker_id, expert, source)
                self.metrics.bytes_moved("peer", response.bytes)
                if response.seconds > 0:
                    self.metrics.migration_seconds(response.seconds)
                self.monitor.refresh(worker_id)
            case p.Publish(placement):
                observed = self.monitor.snapshot()
                unheld = sorted((w, k) for k, holders in placement.items() for w in holders
                                if w not in observed.workers or k not in observed.workers[w].held)
                if unheld:  # copy before switch, checked at the edge: never route to a copy that is not there
                    raise StepFailed(f"not publishing: {len(unheld)} placements name a worker without the expert, "
                                     f"first {unheld[0]}")
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
                watched(self.monitor, self.monitor.stub(worker_id).DropExperts,
                        worker_pb2.DropExpertsRequest(experts=_keys(experts), epoch=epoch), 30, worker_id)
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

    def _restore(self, worker_id: str, experts: tuple, step_now: int, epoch: int) -> None:
        """From the newest snapshot that has the experts and passes its digests; from the checkpoint
        (step 0) when none does. Either way the rollback is recorded and logged."""
        stub = self.monitor.stub(worker_id)
        refused = []
        found = remote_snapshots.listed(stub, self.snapshot_dir) if self.snapshot_dir else []
        for snap in map(from_message, found):
            if not all(k in snap.files for k in experts):
                continue
            request = worker_pb2.RestoreExpertsRequest(directory=str(snap.path), files=[snap.files[k] for k in experts],
                                                       resume_version=step_now, epoch=epoch)
            try:
                response = watched(self.monitor, stub.RestoreExperts, request, COPY_TIMEOUT_S, worker_id)
            except grpc.RpcError as err:
                if err.code() != grpc.StatusCode.DATA_LOSS:
                    raise
                log.error("snapshot %s refused: %s", snap.path, err.details())
                refused.append(str(snap.path))
                continue
            self.metrics.bytes_moved("snapshot", response.bytes_read)
            self._rolled_back(experts, snap.step, step_now, str(snap.path))
            return
        response = watched(self.monitor, stub.LoadExperts, worker_pb2.LoadExpertsRequest(
            experts=_keys(experts), epoch=epoch, version=step_now), COPY_TIMEOUT_S, worker_id)
        self.metrics.bytes_moved("checkpoint", response.bytes_read)
        self._rolled_back(experts, 0, step_now, "checkpoint" + (f" (snapshots refused: {refused})" if refused else ""))

    def restore_pool(self, candidates: list[Snapshot]) -> Iterator[str | Snapshot]:
        """Every holder of every expert back to the first of `candidates` that has every expert and passes
        its digests (inside `paused()`); yields progress, then the snapshot used. StepFailed when none does."""
        placement = self.publisher.table.placement
        if not placement:
            raise ValueError("the pool holds no experts yet")
        observed = self.monitor.snapshot().workers
        down = sorted({w for holders in placement.values() for w in holders
                       if w not in observed or observed[w].state != WorkerState.SERVING})
        if down:
            raise StepFailed(f"restore: workers {down} in the routing table are not serving; the controller replaces "
                             "them first: retry when `moectl status` shows the pool converged")
        by_worker: dict[str, list[tuple[int, int]]] = {}
        for key, holders in sorted(placement.items()):
            for worker_id in holders:
                by_worker.setdefault(worker_id, []).append(key)
        refused, touched = [], False
        for snap in candidates:
            missing = sorted(set(placement) - set(snap.files))
            if missing:
                refused.append(f"{snap.path} lacks experts {missing[:4]}")
                continue
            try:
                for worker_id, keys in sorted(by_worker.items()):  # each worker checks all its files before any change
                    response = watched(self.monitor, self.monitor.stub(worker_id).RestoreExperts,
                                       worker_pb2.RestoreExpertsRequest(
                                           directory=str(snap.path), files=[snap.files[k] for k in keys],
                                           resume_version=snap.step, epoch=self.publisher.table.epoch),
                                       COPY_TIMEOUT_S, worker_id)
                    touched = True
                    self.metrics.bytes_moved("snapshot", response.bytes_read)
                    self.monitor.refresh(worker_id)
                    yield f"{worker_id}: {len(keys)} experts back at step {snap.step}"
            except grpc.RpcError as err:
                if err.code() != grpc.StatusCode.DATA_LOSS:
                    raise StepFailed(f"restore: {worker_id}: {err.code().name}: {err.details()}" + partly(touched)) from None
                log.error("snapshot %s refused: %s", snap.path, err.details())
                refused.append(f"{snap.path}: {err.details()}")
                continue
            except Replan as err:
                raise StepFailed(f"restore: {err}" + partly(touched)) from None
            yield snap
            return
        raise StepFailed(f"no snapshot could be restored: {refused}" + partly(touched))

    def _rolled_back(self, experts: tuple, snapshot_step: int, step_now: int, source: str) -> None:
        for layer, expert in experts:
            self.rollbacks.append({"layer": layer, "expert": expert, "snapshot_step": snapshot_step, "step": step_now,
                                   "source": source})
        log.warning("experts %s lost every copy: restored from %s at step %d, resumed at step %d (%d updates lost)",
                    list(experts), source, snapshot_step, step_now, step_now - snapshot_step)
        self.progress(f"rollback: {len(experts)} experts back to step {snapshot_step} from {source} "
                      f"({step_now - snapshot_step} updates lost)")
