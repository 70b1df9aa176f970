"""Tokens/s that picked each pair of experts together, from the frontends' routing reports.

Each frontend's rates are smoothed over its reports (half the weight on the newest), summed over
frontends, and forgotten when a frontend stops reporting for STALE_S. A restarted controller starts
empty: the frontends' next reports (every few seconds) fill it again.
"""

from __future__ import annotations

import threading
import time

from moecluster.controller.affinity import Pair

STALE_S = 60.0
SMOOTHING = 0.5  # weight of the newest report
FORGET_BELOW = 1e-3  # tokens/s: a pair this rare is dropped, so that the table stays bounded


class PairRates:
    def __init__(self):
        self._lock = threading.Lock()
        self._by_frontend: dict[str, tuple[float, dict[Pair, float]]] = {}  # id -> (reported at, rates)

    def add(self, frontend_id: str, seconds: float, tokens: dict[Pair, float], now: float | None = None) -> None:
        """`tokens` picked each pair over the last `seconds` at frontend `frontend_id`."""
        if seconds <= 0:
            return
        now = time.monotonic() if now is None else now
        with self._lock:
            _, old = self._by_frontend.get(frontend_id, (now, {}))
            rates = {p: (1 - SMOOTHING) * r for p, r in old.items()}
            for pair, count in tokens.items():
                rates[pair] = rates.get(pair, 0.0) + SMOOTHING * count / seconds
            self._by_frontend[frontend_id] = (now, {p: r for p, r in rates.items() if r >= FORGET_BELOW})

    def rates(self, now: float | None = None) -> dict[Pair, float]:
        """Tokens/s per pair, over every frontend that reported within STALE_S."""
        now = time.monotonic() if now is None else now
        out: dict[Pair, float] = {}
        with self._lock:
            for frontend_id, (at, rates) in list(self._by_frontend.items()):
                if now - at > STALE_S:
                    del self._by_frontend[frontend_id]
                    continue
                for pair, rate in rates.items():
                    out[pair] = out.get(pair, 0.0) + rate
        return out
