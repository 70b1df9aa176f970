"""The worker monitor against real workers: it sees deaths fast and survives workers coming and going."""

import os
import threading
import time

from moecluster.controller import plan as p
from moecluster.controller.actuator import WorkerHandle
from moecluster.controller.monitor import WorkerMonitor
from moecluster.controller.observed import WorkerState
from moecluster.controller.spec import ClusterSpec
from moecluster.protos import worker_pb2
from shared import running_workers, wait_for


def test_sees_what_workers_hold_and_a_stopped_one_dies_fast(qwen3):
    placement = {(0, e): ("worker-3" if e < 4 else "worker-7",) for e in range(8)}
    with running_workers(qwen3, placement) as servers:
        monitor = WorkerMonitor(tuple(placement), period=0.1).start()
        try:
            for worker_id, server in servers.items():
                monitor.add(WorkerHandle(worker_id, server.address, os.getpid()))
            assert wait_for(lambda: len(monitor.snapshot().serving) == 2)
            assert monitor.snapshot().workers["worker-3"].held == {(0, e) for e in range(4)}
            servers["worker-7"].stop(0)
            started = time.monotonic()
            assert wait_for(lambda: monitor.snapshot().workers["worker-7"].state == WorkerState.DEAD, 3.0)
            assert time.monotonic() - started < 1.5, "a refused connection on loopback is a dead process"
        finally:
            monitor.stop()


def test_removing_workers_under_heartbeats_kills_no_thread_and_ids_are_not_reused(qwen3):
    placement = {(0, e): (f"worker-{e % 4}",) for e in range(8)}
    with running_workers(qwen3, placement) as servers:
        monitor = WorkerMonitor(tuple(placement), period=0.01).start()  # heartbeats racing the removals
        try:
            for _ in range(5):
                for worker_id, server in servers.items():
                    monitor.add(WorkerHandle(worker_id, server.address, os.getpid()))
                time.sleep(0.05)
                for worker_id in servers:
                    monitor.remove(worker_id)
            assert monitor._thread.is_alive(), "the monitor loop must outlive a channel closed under it"
            assert wait_for(lambda: not [t for t in threading.enumerate() if t.name.startswith("health-")], 3.0)
            observed = monitor.snapshot()
            assert observed.workers == {} and observed.next_index == 4
            spec = ClusterSpec(model="m", workers=2)
            assert p.reconcile(spec, observed, {}) == [p.StartWorker("worker-4"), p.StartWorker("worker-5")]
        finally:
            monitor.stop()


def test_a_heartbeat_answered_before_a_drop_does_not_undo_it(qwen3):
    """Stats calls overlap: one sent before a DropExperts may be answered after the refresh that follows
    it. The plan trusts `held` ("already copied, skip the pull"), so the older answer must not win."""
    placement = {(0, e): ("worker-0",) for e in range(4)}
    with running_workers(qwen3, placement) as servers:
        monitor = WorkerMonitor(tuple(placement), period=3600).start()  # no background beats: we order the calls
        try:
            monitor.add(WorkerHandle("worker-0", servers["worker-0"].address, os.getpid()))
            tracked = monitor._workers["worker-0"]
            before_drop = monitor._stats_call(tracked)
            assert before_drop[1].result().held  # answered now, recorded late
            monitor.stub("worker-0").DropExperts(worker_pb2.DropExpertsRequest(
                experts=[worker_pb2.ExpertKey(layer=0, expert=0)], epoch=1), timeout=5)
            monitor.refresh("worker-0")
            monitor._record(tracked, *before_drop)
            assert monitor.snapshot().workers["worker-0"].held == {(0, e) for e in range(1, 4)}
        finally:
            monitor.stop()


def test_a_version_keeps_the_time_it_was_first_reported(qwen3):
    placement = {(0, e): ("worker-0",) for e in range(2)}
    with running_workers(qwen3, placement) as servers:
        monitor = WorkerMonitor(tuple(placement), period=0.05).start()
        try:
            monitor.add(WorkerHandle("worker-0", servers["worker-0"].address, os.getpid()))
            assert wait_for(lambda: monitor.snapshot().workers["worker-0"].versions == {(0, 0): 0, (0, 1): 0})
            first = monitor.snapshot().workers["worker-0"].version_since
            store = servers["worker-0"].service.store
            store.replace(0, 1, *store.get(0, 1), version=1)  # an update of one expert
            assert wait_for(lambda: monitor.snapshot().workers["worker-0"].versions[(0, 1)] == 1)
            time.sleep(0.2)  # heartbeats that report the same versions again
            seen = monitor.snapshot().workers["worker-0"]
            assert seen.version_since[(0, 0)] == first[(0, 0)], "unchanged: still the first report's time"
            assert first[(0, 1)] < seen.version_since[(0, 1)] < seen.seen_at - 0.1
        finally:
            monitor.stop()
