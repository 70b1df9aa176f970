"""How API-key holders' limits are divided among a cluster's frontends: by where their calls arrive.

A holder's `requests-per-second` and `tokens-per-minute` (wire/access.py) are the cluster's, not each
frontend's. Every frontend reports about once a second how many calls each holder asked of it, let in
or refused (`ShareLimits`). A frontend's part of a holder's limits is its part of that holder's demand
over the frontends heard from lately, each counted with FLOOR calls more: a frontend that saw none still
lets a call through now and then, and its part grows within seconds as a holder's calls move to it.
The parts of one holder sum to 1; behind one frontend its part is 1. A frontend not heard from for
EXPIRE_S no longer counts (it stopped, or lost the controller and acts alone: `frontend/limit_reporter.py`).

    book = ShareBook()
    parts, others = book.report("frontend-a", {"team-a": 30})   # -> ({"team-a": 0.97}, 0.5)
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

FLOOR = 1.0  # calls a report window every frontend is counted with, on top of what it saw
EXPIRE_S = 5.0
SMOOTHING = 0.5  # a report's weight in a frontend's demand: a burst counts at once, a quiet second halves it
FORGET_BELOW = 0.01  # calls a window: demand this small is dropped


class ShareBook:
    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._lock = threading.Lock()
        self._demand: dict[str, dict[str, float]] = {}  # frontend -> holder -> smoothed calls a report window
        self._heard: dict[str, float] = {}  # frontend -> when it last reported

    def report(self, frontend: str, calls: dict[str, int]) -> tuple[dict[str, float], float]:
        """Records what `frontend` was asked since its last report; returns its part of each holder's limits (for
        every holder a live frontend saw lately) and its part of any other holder's (1 / the live frontends)."""
        with self._lock:
            now = self._clock()
            for gone in [f for f, at in self._heard.items() if now - at > EXPIRE_S and f != frontend]:
                del self._heard[gone], self._demand[gone]
            before = self._demand.get(frontend, {})
            mine = {h: SMOOTHING * calls.get(h, 0) + (1 - SMOOTHING) * before.get(h, 0.0) for h in {*before, *calls}}
            self._demand[frontend] = {h: d for h, d in mine.items() if d >= FORGET_BELOW}
            self._heard[frontend] = now
            live = len(self._demand)
            holders = set().union(*self._demand.values())
            parts = {h: (self._demand[frontend].get(h, 0.0) + FLOOR)
                     / (sum(d.get(h, 0.0) for d in self._demand.values()) + live * FLOOR) for h in holders}
            return parts, 1.0 / live

    def frontends(self) -> int:
        """The frontends heard from within EXPIRE_S."""
        with self._lock:
            now = self._clock()
            return sum(now - at <= EXPIRE_S for at in self._heard.values())
