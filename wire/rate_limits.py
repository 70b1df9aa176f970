"""Calls per second and tokens per minute by name: a token bucket each, as API gateways limit their clients.

    limits = RateLimits()
    if not limits.take("team-a", 20.0):   # at most 20 calls/s on average, bursts of 20
        refuse()
    budgets = TokenBudgets()
    if budgets.wait("team-a", 100_000) > 0:   # over its 100k tokens a minute
        refuse()
    budgets.charge("team-a", 812, 100_000)    # what an answered call computed

A bucket holds up to one second of calls (at least one) and refills continuously, so a client
that keeps to its rate is never refused, and one that stops for a second may then send a
second's worth at once. Buckets live in one process; behind several frontends each applies its
part of the limits (`LimitShares`), as the controller divides them (controller/limit_shares.py).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
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


class TokenBudgets:
    """Tokens per minute by name, charged after the fact: a call is let in while its holder's budget is above
    zero, and the tokens it computed (known only once it is answered) are taken from it then, so one large call
    may take it below zero, and its holder waits until the minute refills it. A budget holds up to a minute's
    worth, so a holder that keeps to the rate is never refused."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._lock = threading.Lock()
        self._budgets: dict[str, tuple[float, float]] = {}  # name -> (tokens left, when that was counted)

    def wait(self, name: str, per_minute: float) -> float:
        """Seconds until `name` may call again: 0 while its budget is above zero."""
        with self._lock:
            left = self._refilled(name, per_minute)
        return 0.0 if left > 0 else max(-left * 60.0 / per_minute, 1e-3)  # at exactly 0: nothing left either

    def charge(self, name: str, tokens: int, per_minute: float) -> None:
        with self._lock:
            self._budgets[name] = (self._refilled(name, per_minute) - tokens, self._clock())

    def _refilled(self, name: str, per_minute: float) -> float:
        if per_minute <= 0:
            raise ValueError(f"a budget of {per_minute} tokens/min lets nothing through; give more than 0")
        now = self._clock()
        left, then = self._budgets.get(name, (per_minute, now))
        return min(per_minute, left + (now - then) * per_minute / 60.0)


class LimitShares:
    """This frontend's part of each holder's limits, and the calls each holder asked of it since they were last
    taken: what it reports to the controller, which answers the parts (`update`). Until then, and after it
    `alone()`, every part is 1: a frontend without a controller limits as if it were the only one."""

    def __init__(self):
        self._lock = threading.Lock()
        self._parts: dict[str, float] = {}
        self._others = 1.0
        self._asked: Counter[str] = Counter()

    def part(self, name: str) -> float:
        with self._lock:
            return self._parts.get(name, self._others)

    def asked(self, name: str) -> None:
        with self._lock:
            self._asked[name] += 1

    def take_asked(self) -> dict[str, int]:
        with self._lock:
            asked, self._asked = dict(self._asked), Counter()
            return asked

    def update(self, parts: dict[str, float], others: float) -> None:
        if not all(0 < p <= 1 for p in [*parts.values(), others]):
            raise ValueError(f"limit parts must be in (0, 1]: {parts}, others {others}")
        with self._lock:
            self._parts, self._others = dict(parts), others

    def alone(self) -> None:
        self.update({}, 1.0)

    def parts(self) -> dict[str, float]:
        with self._lock:
            return dict(self._parts)
