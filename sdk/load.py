"""A closed-loop load: clients that send requests back to back and check every answer.

Used by `moectl demo`, the scaling tests and the benchmarks: it counts failed
requests and wrong answers (logits farther than `tolerance` from the expected
ones) and records latencies. Always bounded: it stops on `stop()`, after
`max_seconds`, or after `max_requests`, whichever comes first.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import torch
from moecluster.sdk.client import Client


@dataclass
class LoadReport:
    ok: int = 0
    failed: int = 0
    wrong: int = 0
    worst_error: float = 0.0
    errors: list[str] = field(default_factory=list)
    latencies: list[tuple[float, float]] = field(default_factory=list)  # (start time, seconds)

    def window(self, start: float, end: float) -> list[float]:
        """Latencies of requests that started in [start, end) (time.monotonic())."""
        return [s for t, s in self.latencies if start <= t < end]


class ClosedLoopLoad:
    def __init__(self, address: str, batch: torch.Tensor, expected: torch.Tensor, *, clients: int = 2,
                 tolerance: float = 1e-4, max_seconds: float = 300.0, max_requests: int = 100_000,
                 timeout: float = 60.0):
        self.address, self.batch, self.expected = address, batch, expected
        self.tolerance, self.max_seconds, self.max_requests, self.timeout = tolerance, max_seconds, max_requests, timeout
        self.report = LoadReport()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True, name=f"load-{i}") for i in range(clients)]

    def __enter__(self) -> "ClosedLoopLoad":
        self.started = time.monotonic()
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> LoadReport:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=self.timeout + 5)
        return self.report

    def _run(self) -> None:
        client = Client(self.address, timeout=self.timeout)
        deadline = time.monotonic() + self.max_seconds
        try:
            while not self._stop.is_set() and time.monotonic() < deadline:
                start = time.monotonic()
                try:
                    logits = client.forward(self.batch)
                    error = (logits - self.expected).abs().max().item()
                    outcome = "ok" if error <= self.tolerance else "wrong"
                except Exception as err:  # noqa: BLE001 - every failure is counted, none stops the load
                    outcome, error = "failed", 0.0
                    message = str(err)
                seconds = time.monotonic() - start
                with self._lock:
                    r = self.report
                    if r.ok + r.failed + r.wrong >= self.max_requests:
                        return
                    r.latencies.append((start, seconds))
                    r.worst_error = max(r.worst_error, error)
                    if outcome == "ok":
                        r.ok += 1
                    elif outcome == "wrong":
                        r.wrong += 1
                    else:
                        r.failed += 1
                        if len(r.errors) < 20:
                            r.errors.append(message)
        finally:
            client.close()


def time_scalings(address: str, batch: torch.Tensor, expected: torch.Tensor, scale, *, low: int = 2, high: int = 3,
                  scalings: int = 2) -> dict:
    """Scales `low -> high -> low` `scalings` times under a checked load; `scale(n)` returns once n workers serve.

    Returns the median and each scale-up time, and the requests answered, failed and wrong (benchmarks)."""
    import statistics

    times = []
    with ClosedLoopLoad(address, batch, expected, clients=2, max_seconds=400) as load:
        time.sleep(1)
        for _ in range(scalings):
            started = time.monotonic()
            scale(high)
            times.append(time.monotonic() - started)
            time.sleep(0.5)
            scale(low)
            time.sleep(0.5)
    r = load.report
    return {"scale_up_s": statistics.median(times), "all": times, "ok": r.ok, "failed": r.failed, "wrong": r.wrong}
