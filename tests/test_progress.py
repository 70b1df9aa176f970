"""controller.progress: what a waiting scale, drain or replace prints."""

from __future__ import annotations

from moecluster.controller.observed import Observed, WorkerObservation, WorkerState
from moecluster.controller.progress import SAY_WAITING_AFTER_S, progress_line
from moecluster.controller.spec import ClusterSpec


def observed(**states: WorkerState) -> Observed:
    workers = {w.replace("_", "-"): WorkerObservation(w.replace("_", "-"), "a", 1, s) for w, s in states.items()}
    return Observed(workers, ((0, 0),))


def test_a_replace_waiting_for_its_successor_counts_the_leaving_worker_out_and_then_says_why_it_waits():
    spec = ClusterSpec(model="m", workers=3, drained=["worker-0"])
    pool = observed(worker_0=WorkerState.SERVING, worker_1=WorkerState.SERVING, worker_2=WorkerState.SERVING,
                    worker_3=WorkerState.STARTING)
    assert progress_line(spec, pool, 7, waited=1.0) == "2/3 workers serving, epoch 7"
    late = progress_line(spec, pool, 7, waited=SAY_WAITING_AFTER_S * 3.5, last_error="start/worker-3: no room")
    assert late == "2/3 workers serving, epoch 7; waiting 30s+ for worker-3 to start; last error: start/worker-3: no room"
    # The line changes once per period, not with every poll.
    assert progress_line(spec, pool, 7, SAY_WAITING_AFTER_S * 3.9) == progress_line(spec, pool, 7, SAY_WAITING_AFTER_S * 3.1)


def test_a_spare_stands_in_for_a_worker_still_to_join():
    spec = ClusterSpec(model="m", workers=2)
    assert progress_line(spec, observed(worker_0=WorkerState.SERVING, worker_1=WorkerState.SERVING,
                                        worker_2=WorkerState.SERVING), 3, 60.0) == "2/2 workers serving, epoch 3"
