"""Calls per second by name: a token bucket each, as API gateways limit their clients.

    limits = RateLimits()
    if not limits.take("team-a", 20.0):   # at most 20 calls/s on average, bursts of 20
        refuse()

A bucket holds up to one second of calls (at least one) and refills continuously, so a client
that keeps to its rate is never refused, and one that stops for a second may then send a
second's worth at once. Buckets live in one process: behind N frontends a client gets N times
its rate.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class RateLimits:
    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[float, float]] = {}  # name -> (calls it may make now, when that was counted)

    def take(self, name: str, per_second: float) -> bool:
        """Whether `name` may make a call now, at `per_second` calls a second (counted if so)."""
        if per_second <= 0:
            raise ValueError(f"a rate of {per_second} calls/s lets nothing through; give more than 0")
        burst = max(1.0, per_second)
        with self._lock:
            now = self._clock()
            tokens, then = self._buckets.get(name, (burst, now))
            tokens = min(burst, tokens + (now - then) * per_second)
            allowed = tokens >= 1.0
            self._buckets[name] = (tokens - 1.0 if allowed else tokens, now)
            return allowed
