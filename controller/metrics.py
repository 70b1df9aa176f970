"""The controller's metrics, exported in Prometheus' text format.

Kept as plain counters and gauges so the core needs no exporter; the process
that hosts the controller serves `render()` on /metrics.
"""

from __future__ import annotations

import threading
from collections import defaultdict


class ControllerMetrics:
    def __init__(self):
        self._lock = threading.Lock()
        self._epoch = 0
        self._bytes: dict[str, int] = defaultdict(int)
        self._steps: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])  # count, seconds
        self._migrations = [0, 0.0]
        self._scales: list[float] = [0, 0.0]
        self._gauges: dict[str, float] = {}

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

    def gauge(self, name: str, value: float) -> None:
        with self._lock:
            self._gauges[name] = value

    def moved(self) -> dict[str, int]:
        with self._lock:
            return dict(self._bytes)

    def render(self) -> str:
        """Prometheus text exposition format."""
        with self._lock:
            lines = ["# TYPE moecluster_epoch gauge", f"moecluster_epoch {self._epoch}",
                     "# TYPE moecluster_bytes_moved_total counter"]
            lines += [f'moecluster_bytes_moved_total{{source="{k}"}} {v}' for k, v in sorted(self._bytes.items())]
            lines += ["# TYPE moecluster_step_seconds summary"]
            for step, (count, seconds) in sorted(self._steps.items()):
                lines += [f'moecluster_step_seconds_count{{step="{step}"}} {count}',
                          f'moecluster_step_seconds_sum{{step="{step}"}} {seconds:.6f}']
            lines += ["# TYPE moecluster_migration_seconds summary",
                      f"moecluster_migration_seconds_count {self._migrations[0]}",
                      f"moecluster_migration_seconds_sum {self._migrations[1]:.6f}",
                      "# TYPE moecluster_scale_seconds summary",
                      f"moecluster_scale_seconds_count {self._scales[0]}",
                      f"moecluster_scale_seconds_sum {self._scales[1]:.6f}"]
            for name, value in sorted(self._gauges.items()):
                lines += [f"# TYPE moecluster_{name} gauge", f"moecluster_{name} {value}"]
        return "\n".join(lines) + "\n"
