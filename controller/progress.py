"""The line an admin call waiting for its pool prints (scale, drain, replace), built from what is observed.

Pure: the runtime polls, this says what the poll shows. After SAY_WAITING_AFTER_S it also says what the pool
waits for, so a long wait is not a silent one: a worker that does not come up (a pod with no room on any node,
a Ray actor with no resources) and the last step that failed.
"""

from __future__ import annotations

from moecluster.controller.observed import Observed, WorkerState, worker_index
from moecluster.controller.spec import ClusterSpec

SAY_WAITING_AFTER_S = 10.0  # then again every 10 s: the line changes only that often


def progress_line(spec: ClusterSpec, observed: Observed, epoch: int, waited: float, last_error: str = "") -> str:
    """'2/3 workers serving, epoch 7', and after a while what it waits for. A leaving worker does not count;
    a spare stands in for a worker still to join."""
    staying = [w for w in observed.serving if w not in spec.drained]
    line = f"{min(len(staying), spec.workers)}/{spec.workers} workers serving, epoch {epoch}"
    if waited < SAY_WAITING_AFTER_S:
        return line
    starting = sorted(observed.in_state(WorkerState.STARTING), key=worker_index)
    if starting:
        line += f"; waiting {waited // SAY_WAITING_AFTER_S * SAY_WAITING_AFTER_S:.0f}s+ for {', '.join(starting)} to start"
    if last_error:
        line += f"; last error: {last_error}"
    return line
