"""Watches every worker: Stats heartbeats plus the gRPC health stream.

A worker killed outright breaks its health stream at once (the connection
resets), which triggers an immediate probe; a hung worker (SIGSTOP, a stuck
GPU) answers no heartbeat and is declared dead `dead_after` seconds after its
last answer. Load per expert is the rate of the token counters workers report.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent import futures

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from moecluster.controller.actuator import WorkerHandle
from moecluster.controller.observed import ExpertKey, Observed, WorkerObservation, WorkerState, worker_index
from moecluster.protos import worker_pb2, worker_pb2_grpc
from moecluster.wire import endpoints, streaming

LOAD_SMOOTHING = 0.3  # weight of the newest rate sample
REFUSED_DEAD_AFTER = 0.2  # connection refused this long on loopback: the process is gone


class _Tracked:
    def __init__(self, handle: WorkerHandle):
        self.handle = handle
        self.channel = endpoints.internal_channel(handle.address, options=streaming.GRPC_OPTIONS)
        self.stub = worker_pb2_grpc.ExpertWorkerStub(self.channel)
        self.state = WorkerState.STARTING
        self.held: frozenset[ExpertKey] = frozenset()
        self.versions: dict[ExpertKey, int] = {}
        self.version_since: dict[ExpertKey, float] = {}  # when each held expert's version was first reported
        self.seen_at = 0.0
        self.epoch = 0
        self.device = ""
        self.last_ok = time.monotonic()
        self.refused_since: float | None = None  # first of an unbroken run of UNAVAILABLE answers
        self.removed = False  # set by remove(): its threads stop touching it
        self.tokens: dict[ExpertKey, int] = {}
        self.rates: dict[ExpertKey, float] = {}
        self.sampled_at = 0.0
        # Stats calls overlap (heartbeats, refreshes after commands): an answer counts only when no call
        # started after it has been recorded, or a heartbeat sent before a drop could undo the drop.
        self.calls_started = 0
        self.newest_recorded = 0


class WorkerMonitor:
    def __init__(self, experts: tuple[ExpertKey, ...], *, period: float = 0.25, dead_after: float = 1.0,
                 rpc_timeout: float = 0.5, on_change: Callable[[], None] = lambda: None):
        self.experts = experts
        self.period, self.dead_after, self.rpc_timeout = period, dead_after, rpc_timeout
        self.on_change = on_change
        self._lock = threading.Lock()
        self._workers: dict[str, _Tracked] = {}
        self.next_index = 0  # worker ids are never reused: a replacement is a new worker, in logs and metrics
        self._stopped = threading.Event()
        self._probe_now = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="worker-monitor", daemon=True)

    def start(self) -> "WorkerMonitor":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        self._probe_now.set()
        self._thread.join(timeout=5)
        with self._lock:
            for tracked in self._workers.values():
                tracked.channel.close()

    def add(self, handle: WorkerHandle) -> None:
        with self._lock:
            if handle.id in self._workers:
                return
            tracked = self._workers[handle.id] = _Tracked(handle)
            self.next_index = max(self.next_index, worker_index(handle.id) + 1)
        threading.Thread(target=self._watch_health, args=(tracked,), name=f"health-{handle.id}", daemon=True).start()
        self._probe(tracked)

    def remove(self, worker_id: str) -> None:
        with self._lock:
            tracked = self._workers.pop(worker_id, None)
            if tracked is not None:
                tracked.removed = True
        if tracked is not None:
            tracked.channel.close()

    def mark_dead(self, worker_id: str) -> None:
        with self._lock:
            if worker_id in self._workers:
                self._workers[worker_id].state = WorkerState.DEAD
        self.on_change()

    def snapshot(self) -> Observed:
        with self._lock:
            workers = {
                w: WorkerObservation(w, t.handle.address, t.handle.pid, t.state, t.held, t.epoch, dict(t.rates),
                                     dict(t.versions), t.device, t.seen_at, dict(t.version_since))
                for w, t in self._workers.items()
            }
        return Observed(workers, self.experts, self.next_index)

    def handle(self, worker_id: str) -> WorkerHandle:
        with self._lock:
            return self._workers[worker_id].handle

    def stub(self, worker_id: str) -> worker_pb2_grpc.ExpertWorkerStub:
        with self._lock:
            return self._workers[worker_id].stub

    def dead(self, worker_ids) -> list[str]:
        """Those of `worker_ids` declared dead (or no longer tracked)."""
        with self._lock:
            return sorted(w for w in worker_ids if w not in self._workers or self._workers[w].state == WorkerState.DEAD)

    def refresh(self, worker_id: str) -> None:
        """Probes one worker now (after a command changed what it holds)."""
        with self._lock:
            tracked = self._workers.get(worker_id)
        if tracked is not None:
            self._probe(tracked)

    # ----------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stopped.is_set():
            self._probe_now.wait(self.period)
            self._probe_now.clear()
            with self._lock:
                tracked = [t for t in self._workers.values() if t.state != WorkerState.DEAD]
            calls = [(t, self._stats_call(t)) for t in tracked]
            for t, call in calls:
                if call is not None:
                    self._record(t, *call)

    def _probe(self, tracked: _Tracked) -> None:
        call = self._stats_call(tracked)
        if call is not None:
            self._record(tracked, *call)

    def _stats_call(self, tracked: _Tracked) -> tuple[int, futures.Future] | None:
        """Starts a Stats heartbeat -> (its sequence number, the call); None when the worker was removed
        (its channel closed) meanwhile."""
        with self._lock:
            tracked.calls_started += 1
            sequence = tracked.calls_started
        try:
            return sequence, tracked.stub.Stats.future(worker_pb2.StatsRequest(), timeout=self.rpc_timeout)
        except ValueError:  # "Channel closed!": remove() won the race; nothing to observe
            return None

    def _record(self, tracked: _Tracked, sequence: int, call: futures.Future) -> None:
        now = time.monotonic()
        try:
            stats = call.result()
        except grpc.RpcError as err:
            with self._lock:
                if err.code() == grpc.StatusCode.UNAVAILABLE:
                    tracked.refused_since = tracked.refused_since or now
                refused_long = tracked.refused_since is not None and now - tracked.refused_since >= REFUSED_DEAD_AFTER
                if tracked.state != WorkerState.DEAD and (refused_long or now - tracked.last_ok > self.dead_after):
                    tracked.state = WorkerState.DEAD
                    changed = True
                else:
                    changed = False
            if changed:
                self.on_change()
            return
        held = frozenset((k.layer, k.expert) for k in stats.held)
        state = WorkerState.DRAINING if stats.draining else WorkerState.SERVING
        with self._lock:
            if tracked.state == WorkerState.DEAD:
                return  # fenced: once dead, a worker that wakes up is never trusted again
            if sequence < tracked.newest_recorded:
                return  # overtaken: a later call already reported what the worker holds now
            tracked.newest_recorded = sequence
            changed = state != tracked.state or held != tracked.held
            tracked.state, tracked.held, tracked.epoch, tracked.last_ok = state, held, stats.epoch, now
            tracked.device = stats.device
            versions = {(k.layer, k.expert): v for k, v in zip(stats.held, stats.versions)}
            tracked.version_since = {k: tracked.version_since[k] if tracked.versions.get(k) == v else now
                                     for k, v in versions.items()}
            tracked.versions, tracked.seen_at = versions, now
            tracked.refused_since = None
            self._update_rates(tracked, stats, now)
        if changed:
            self.on_change()

    @staticmethod
    def _update_rates(tracked: _Tracked, stats, now: float) -> None:
        dt = now - tracked.sampled_at if tracked.sampled_at else 0.0
        tokens = {(s.expert.layer, s.expert.expert): s.tokens for s in stats.experts}
        if dt > 0:
            for key, count in tokens.items():
                delta = max(0, count - tracked.tokens.get(key, 0))
                old = tracked.rates.get(key, delta / dt)
                tracked.rates[key] = (1 - LOAD_SMOOTHING) * old + LOAD_SMOOTHING * delta / dt
            tracked.rates = {k: v for k, v in tracked.rates.items() if k in tokens}
        tracked.tokens, tracked.sampled_at = tokens, now

    def _watch_health(self, tracked: _Tracked) -> None:
        """Blocks on the health stream; when it breaks, probe at once instead of waiting for the next beat."""
        stub = health_pb2_grpc.HealthStub(tracked.channel)
        while not self._stopped.is_set() and tracked.state != WorkerState.DEAD and not tracked.removed:
            try:
                for _ in stub.Watch(health_pb2.HealthCheckRequest(service="")):
                    pass
            except (grpc.RpcError, ValueError):
                pass  # stream broken (or channel closed): fall through to a probe
            if self._stopped.is_set() or tracked.removed:
                return
            self._probe_now.set()
            time.sleep(self.period / 2)
