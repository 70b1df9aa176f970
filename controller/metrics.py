"""The controller's metrics, exported in Prometheus' text format.

Kept as plain counters and gauges so the core needs no exporter; the process
that hosts the controller serves `render()` on /metrics.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from dataclasses import dataclass

from moecluster.observability.prometheus import format_value, label_set


class ControllerMetrics:
    def __init__(self):
        self._lock = threading.Lock()
        self._epoch = 0
        self._bytes: dict[str, int] = defaultdict(int)
        self._steps: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])  # count, seconds
        self._migrations = [0, 0.0]
        self._scales: list[float] = [0, 0.0]
        self._gauges: dict[str, float] = {}
        self._labelled: dict[str, tuple[str, dict[str, float]]] = {}  # family -> (label, {label value: value})
        self._resynced = 0  # replicas that missed a training update, caught up from a peer

    def epoch(self, value: int) -> None:
        with self._lock:
            self._epoch = value

    def bytes_moved(self, kind: str, count: int) -> None:
        with self._lock:
            self._bytes[kind] += count

    def step_seconds(self, step: str, seconds: float) -> None:
        with self._lock:
            row = self._steps[step]
            row[0] += 1
            row[1] += seconds

    def migration_seconds(self, seconds: float) -> None:
        with self._lock:
            self._migrations[0] += 1
            self._migrations[1] += seconds

    def scale_seconds(self, seconds: float) -> None:
        with self._lock:
            self._scales[0] += 1
            self._scales[1] += seconds

    def replica_resynced(self) -> None:
        with self._lock:
            self._resynced += 1

    def gauge(self, name: str, value: float) -> None:
        with self._lock:
            self._gauges[name] = value

    def labelled_gauge(self, name: str, label: str, values: dict[str, float]) -> None:
        """A gauge per label value (all of them at once: a value left out is gone)."""
        with self._lock:
            self._labelled[name] = (label, dict(values))

    def moved(self) -> dict[str, int]:
        with self._lock:
            return dict(self._bytes)

    def samples(self, **labels: str) -> list[Sample]:
        """Every value as (family, type, sample name, labels), each with `labels` added."""
        def row(family, kind, value, name="", **own):
            return Sample(family, kind, name or family, {**labels, **own}, value)

        with self._lock:
            out = [row("moecluster_epoch", "gauge", self._epoch)]
            out += [row("moecluster_bytes_moved_total", "counter", v, source=k) for k, v in sorted(self._bytes.items())]
            for step, (count, seconds) in sorted(self._steps.items()):
                out += [row("moecluster_step_seconds", "summary", count, "moecluster_step_seconds_count", step=step),
                        row("moecluster_step_seconds", "summary", seconds, "moecluster_step_seconds_sum", step=step)]
            for family, (count, seconds) in (("moecluster_migration_seconds", self._migrations),
                                             ("moecluster_scale_seconds", self._scales)):
                out += [row(family, "summary", count, family + "_count"), row(family, "summary", seconds, family + "_sum")]
            out.append(row("moecluster_replicas_resynced_total", "counter", self._resynced))
            out += [row(f"moecluster_{name}", "gauge", value) for name, value in sorted(self._gauges.items())]
            for name, (label, values) in sorted(self._labelled.items()):
                out += [row(f"moecluster_{name}", "gauge", v, **{label: k}) for k, v in values.items()]
        return out

    def render(self) -> str:
        """Prometheus text exposition format."""
        return exposition(self.samples())


@dataclass(frozen=True)
class Sample:
    family: str
    kind: str  # gauge, counter, summary
    name: str
    labels: dict[str, str]
    value: float


def exposition(samples: list[Sample]) -> str:
    """Prometheus text format: each family once, with its TYPE line, its samples together (as the
    format requires, also where several controllers' samples are merged)."""
    families: dict[str, list[Sample]] = {}
    for sample in samples:
        families.setdefault(sample.family, []).append(sample)
    lines = []
    for family, rows in families.items():
        lines.append(f"# TYPE {family} {rows[0].kind}")
        lines += [f"{r.name}{label_set(r.labels.items())} {format_value(r.value)}" for r in rows]
    return "\n".join(lines) + "\n"
