"""The executor against a real worker: copy before switch is checked where the table is published."""

import os

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
