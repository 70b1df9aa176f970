"""A worker process no record names is stopped, not left serving.

A controller killed after the zygote forked a worker for it but before it wrote the worker's record
down leaves a process nobody knows of: before, it served on after `down` (seen once in CI, after
test_elastic's controller-killed-during-a-scale scenario). The restarted controller stops such a
process when it rebuilds its state, and `down` stops any process naming the cluster's run folder.
Both on a real local cluster, the orphans being real workers forked by the cluster's own zygote.
"""

from __future__ import annotations

import os
import signal
import time

from moecluster.backends import zygote
from moecluster.backends.processes import ProcessRecord, alive

WAIT_S = 60.0


def fork_unrecorded_worker(c, name: str) -> ProcessRecord:
    """What a controller killed between the fork's answer and its record leaves: a serving worker, no record."""
    sock = ProcessRecord.load(c.dir / "zygote.json").address
    run = c.dir / "run"
    ready = run / f"{name}.ready"
    argv = ["--checkpoint", c.spec().model, "--experts", "", "--worker-id", name, "--metrics-port", "-1",
            "--ready-file", str(ready)]
    pid = zygote.fork_worker(sock, argv, c.dir / "logs" / f"{name}.log")
    orphan = ProcessRecord(name, pid, "", "", str(run))
    deadline = time.monotonic() + WAIT_S
    while not ready.is_file() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ready.is_file() and alive(orphan), f"the orphan {name} never served"
    return orphan


def wait_gone(record: ProcessRecord, timeout: float = WAIT_S) -> bool:
    deadline = time.monotonic() + timeout
    while alive(record) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not alive(record)


def test_a_worker_no_record_names_is_stopped_by_the_restarted_controller_and_by_down(local_clusters, qwen3):
    c = local_clusters("orphans", qwen3, workers=1, replicas=1)
    recorded = {w["id"]: w["pid"] for w in c.status()["workers"]}
    orphan = fork_unrecorded_worker(c, "w-orphan-1")
    assert alive(orphan)  # nothing stops it while the controller that knows nothing of it runs on

    controller = c.controller_record()
    os.kill(controller.pid, signal.SIGKILL)  # its supervisor starts another, which rebuilds from the records
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        now = c.controller_record()
        if now is not None and now.pid != controller.pid and now.address:
            break
        time.sleep(0.1)
    status = c.wait_converged(WAIT_S, lambda _: None)
    assert c.controller_record().pid != controller.pid
    assert wait_gone(orphan, 5), "the restarted controller left the unrecorded worker serving"
    assert {w["id"]: w["pid"] for w in status["workers"]} == recorded, "a recorded worker was touched"
    assert "which no record names" in (c.dir / "logs" / "controller.log").read_text()

    second = fork_unrecorded_worker(c, "w-orphan-2")  # and one that appears after that controller started
    stopped = c.down(grace=2)
    assert wait_gone(second, 5), "down left the unrecorded worker serving"
    assert second.pid in {r.pid for r in stopped}, "down must count what it stopped"
    assert not any(alive(ProcessRecord("w", pid, "", "", str(c.dir / "run"))) for pid in recorded.values())
