"""What the controller sees: workers as they report themselves.

Observations come from the workers (Stats heartbeats) and the backend (which
processes it started), never from the controller's own memory of what it
asked for: after a restart it knows exactly as much as before.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum

ExpertKey = tuple[int, int]


class WorkerState(str, Enum):
    STARTING = "starting"  # started by the backend, not answering yet
    SERVING = "serving"
    DRAINING = "draining"  # NOT_SERVING: finishing what it has, about to stop
    DEAD = "dead"  # stopped answering: out of the table, to be replaced


@dataclass(frozen=True)
class WorkerObservation:
    id: str
    address: str
    pid: int
    state: WorkerState
    held: frozenset[ExpertKey] = frozenset()
    epoch: int = 0
    load: dict[ExpertKey, float] = field(default_factory=dict)  # tokens/s per expert, recent window
    versions: dict[ExpertKey, int] = field(default_factory=dict)  # training updates applied, per held expert
    device: str = ""  # where its experts live, as the worker says ("" before its first answer)
    seen_at: float = 0.0  # monotonic time of the answer these fields come from
    version_since: dict[ExpertKey, float] = field(default_factory=dict)  # when each version was first reported


def worker_index(worker_id: str) -> int:
    """'worker-12' -> 12; -1 for an id without a trailing number."""
    match = re.search(r"(\d+)$", worker_id)
    return int(match[1]) if match else -1


@dataclass(frozen=True)
class Observed:
    workers: dict[str, WorkerObservation]
    experts: tuple[ExpertKey, ...]  # every expert the model has
    next_index: int = 0  # lowest worker number never used yet (ids are not reused)

    def in_state(self, *states: WorkerState) -> dict[str, WorkerObservation]:
        return {w: o for w, o in self.workers.items() if o.state in states}

    @property
    def serving(self) -> dict[str, WorkerObservation]:
        return self.in_state(WorkerState.SERVING)

    def load(self) -> dict[ExpertKey, float]:
        """Total observed load per expert, over the copies workers hold now. A worker's rate for an expert it
        dropped decays over a few heartbeats while its new holder's is there at once: counted, every move
        would look like a hot expert for a second or two, and the planner would chase it."""
        total: dict[ExpertKey, float] = {}
        for obs in self.workers.values():
            for key, rate in obs.load.items():
                if key in obs.held:
                    total[key] = total.get(key, 0.0) + rate
        return total

    @property
    def step(self) -> int:
        """Training steps the pool has applied: the highest version a serving worker holds (0: never trained)."""
        return max((v for o in self.serving.values() for v in o.versions.values()), default=0)

    @property
    def lowest_step(self) -> int:
        """The step of the expert whose newest copy is the oldest: below `step` while an update is being
        applied, and for good when its trainer stopped mid-way (the pool then needs a restore)."""
        newest: dict[ExpertKey, int] = {}
        for obs in self.serving.values():
            for key, version in obs.versions.items():
                newest[key] = max(version, newest.get(key, version))
        return min(newest.values(), default=0)

    def max_epoch(self) -> int:
        return max((o.epoch for o in self.workers.values()), default=0)
