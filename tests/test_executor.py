"""The executor against a real worker: copy before switch is checked where the table is published."""

import os
from types import SimpleNamespace

import pytest
from moecluster.controller import plan as p
from moecluster.controller.actuator import WorkerHandle
from moecluster.controller.executor import Executor, StepFailed
from moecluster.controller.metrics import ControllerMetrics
from moecluster.controller.monitor import WorkerMonitor
from moecluster.controller.publisher import Publisher
from shared import running_workers


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
