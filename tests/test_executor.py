"""The executor against real workers: copy before switch is checked where the table is published; a pool
restore falls back past a torn snapshot."""

import os
from types import SimpleNamespace

import pytest
from moecluster.controller import plan as p
from moecluster.controller.actuator import WorkerHandle
from moecluster.controller.executor import Executor, StepFailed
from moecluster.controller.metrics import ControllerMetrics
from moecluster.controller.monitor import WorkerMonitor
from moecluster.controller.publisher import Publisher
from moecluster.protos import worker_pb2
from moecluster.workers import snapshot_folders
from shared import running_workers
from worker_helpers import keys, stats, stub_for


def test_a_table_naming_a_worker_without_the_expert_is_never_published(qwen3):
    placement = {(0, e): ("worker-0",) for e in range(4)}
    with running_workers(qwen3, placement) as servers:
        monitor = WorkerMonitor(tuple(placement), period=3600).start()
        try:
            monitor.add(WorkerHandle("worker-0", servers["worker-0"].address, os.getpid()))
            publisher = Publisher()
            executor = Executor(None, monitor, publisher, ControllerMetrics(), progress=lambda _: None)
            executor.run([p.Publish(placement)])
            assert publisher.table.epoch == 1
            with pytest.raises(StepFailed, match=r"first \('worker-0', \(0, 5\)\)"):
                executor.run([p.Publish({**placement, (0, 5): ("worker-0",)})])
            with pytest.raises(StepFailed, match="worker-9"):
                executor.run([p.Publish({**placement, (0, 1): ("worker-0", "worker-9")})])
            assert publisher.table.epoch == 1 and publisher.table.placement == placement
        finally:
            monitor.stop()


def test_copies_pause_the_table_even_with_no_trainer_so_one_that_connects_meanwhile_waits():
    publisher = Publisher()
    executor = Executor(None, SimpleNamespace(), publisher, ControllerMetrics(), progress=lambda _: None)
    with executor.paused():
        assert publisher.table.epoch == 0, "before the first table there is nothing to pause"
    placement = {(0, 0): ("worker-0",)}
    publisher.publish(placement, {"worker-0": "127.0.0.1:1"})
    with executor.paused():
        assert publisher.table.paused and publisher.table.epoch == 2
        first = next(publisher.watch("late-trainer", 0, lambda: True, trainer=True))
        assert first.paused, "a trainer connecting mid-copy must not start a step"
    assert not publisher.table.paused and publisher.table.placement == placement


def test_a_pool_restore_falls_back_past_a_torn_snapshot_and_refuses_a_table_with_a_worker_down(qwen3, tmp_path):
    placement = {(0, e): ("worker-0",) if e < 4 else ("worker-1",) for e in range(8)}
    with running_workers(qwen3, placement) as servers:
        monitor = WorkerMonitor(tuple(placement), period=3600).start()
        channels = {w: stub_for(servers[w]) for w in servers}
        try:
            for w in servers:
                monitor.add(WorkerHandle(w, servers[w].address, os.getpid()))
            for step in (3, 5):  # the same weights, sealed as two steps
                partial = snapshot_folders.partial_dir(tmp_path)
                files = [f for w, (_, stub) in sorted(channels.items()) for f in stub.WriteSnapshot(
                    worker_pb2.WriteSnapshotRequest(directory=str(partial), experts=keys(
                        *[k for k, h in placement.items() if h == (w,)])), timeout=30).files]
                newest = snapshot_folders.seal(partial, step, files)
            torn = newest.path / newest.files[(0, 6)].file  # worker-1's, so worker-0 restores step 5 before it is seen
            torn.write_bytes(torn.read_bytes()[:-8])
            publisher = Publisher()
            publisher.publish(placement, {w: s.address for w, s in servers.items()})
            executor = Executor(None, monitor, publisher, ControllerMetrics(), progress=lambda _: None)
            out = list(executor.restore_pool(snapshot_folders.candidates(tmp_path)))
            assert out[-1].step == 3 and "worker-0: 4 experts back at step 5" in out
            assert {w: set(stats(stub).versions) for w, (_, stub) in channels.items()} == {"worker-0": {3}, "worker-1": {3}}

            publisher.publish({**placement, (0, 0): ("worker-0", "worker-9")},
                              {**{w: s.address for w, s in servers.items()}, "worker-9": "127.0.0.1:1"})
            with pytest.raises(StepFailed, match=r"workers \['worker-9'\] in the routing table are not serving"):
                list(executor.restore_pool(snapshot_folders.candidates(tmp_path)))
        finally:
            for channel, _ in channels.values():
                channel.close()
            monitor.stop()


def test_a_copy_into_a_worker_that_hangs_is_abandoned_and_the_worker_replaced(local_clusters, checkpoints):
    """A worker SIGSTOPped before a migration into it misses its heartbeats within a second; the copy must not
    hold the controller (and every other change) for the copy's 300 s deadline."""
    import signal
    import time

    from moecluster.backends.local import ClusterError
    from shared import wait_for

    c = local_clusters("hang", checkpoints["qwen3_moe"], 2, 1)
    workers = {w["id"]: w for w in c.status()["workers"]}
    target = "worker-1"
    expert = next(e for e in range(8) if [0, e] not in workers[target]["experts"])
    os.kill(workers[target]["pid"], signal.SIGSTOP)
    try:
        started = time.monotonic()
        with pytest.raises(ClusterError, match="stopped answering"):
            list(c.migrate(0, expert, target))
        assert time.monotonic() - started < 30
        assert wait_for(lambda: sum(w["state"] == "serving" for w in c.status()["workers"]) == 2
                        and target not in {w["id"] for w in c.status()["workers"]}, timeout=30), c.status()["workers"]
    finally:
        try:
            os.kill(workers[target]["pid"], signal.SIGCONT)
        except ProcessLookupError:  # killed for good by the controller, as it should be
            pass
