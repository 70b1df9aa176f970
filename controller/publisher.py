"""The routing table's single source: publish an epoch, stream it to frontends, collect their acks.

Epochs only grow. A frontend acknowledges an epoch once it routes new requests
by it; `await_acks` is what lets the controller drop an expert's old copy only
when no frontend can still send new requests there (copy, switch, then drop).

A frontend whose watch stream broke is still waited for during a lease (it is
most likely reconnecting, with an older table), unless it said it was leaving;
and a controller that restarts
over a serving pool waits one lease before any drop, so that frontends it has
never heard of can reconnect and acknowledge first.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Collection, Iterator
from dataclasses import dataclass

from moecluster.controller.observed import ExpertKey

Placement = dict[ExpertKey, tuple[str, ...]]


@dataclass(frozen=True)
class Table:
    epoch: int
    addresses: dict[str, str]  # worker id -> host:port, for every worker the placement names
    placement: Placement
    paused: bool = False  # expert state is being copied: trainers hold at their step boundary


LEASE_S = 3.0  # frontends retry a broken watch every 0.2 s


class Publisher:
    def __init__(self, epoch: int = 0, *, lease_s: float = LEASE_S):
        self._cond = threading.Condition()
        self._table = Table(epoch, {}, {})
        self._acks: dict[str, int] = {}  # frontend id -> acknowledged epoch
        self._watching: dict[str, int] = {}  # frontend id -> open watch streams
        self._gone: dict[str, float] = {}  # frontend id -> when its last watch stream closed
        self._trainers: set[str] = set()  # frontends that train (they hold paused acks until a step ends)
        self._left: set[str] = set()  # said they are closing while their watch stream is still open
        self._lease_s = lease_s
        self._warm_until = 0.0
        self._closed = False

    def expect_reconnects(self) -> None:
        """The pool served under an earlier controller: frontends we do not know yet may route
        by an older table, so await_acks waits one lease for them to come back."""
        with self._cond:
            self._warm_until = time.monotonic() + self._lease_s

    @property
    def table(self) -> Table:
        return self._table

    def publish(self, placement: Placement, addresses: dict[str, str], *, min_epoch: int = 0,
                paused: bool = False) -> Table:
        """Makes `placement` the table at the next epoch (at least `min_epoch`) and wakes every watcher."""
        holders = {w for ws in placement.values() for w in ws}
        unknown = holders - set(addresses)
        if unknown:
            raise ValueError(f"placement names workers without an address: {sorted(unknown)}")
        with self._cond:
            epoch = max(self._table.epoch + 1, min_epoch)
            self._table = Table(epoch, {w: addresses[w] for w in sorted(holders)}, dict(placement), paused)
            self._cond.notify_all()
            return self._table

    def ack(self, frontend_id: str, epoch: int) -> None:
        with self._cond:
            self._acks[frontend_id] = max(epoch, self._acks.get(frontend_id, 0))
            self._cond.notify_all()

    def trainers(self) -> list[str]:
        """Trainers watching, or whose stream broke less than a lease ago."""
        with self._cond:
            now = time.monotonic()
            recent = {f for f, t in self._gone.items() if now - t < self._lease_s}
            return sorted(f for f in self._trainers if (f in self._watching or f in recent) and f not in self._left)

    def frontends(self) -> dict[str, int]:
        with self._cond:
            return {f: self._acks.get(f, 0) for f in self._watching if f not in self._left}

    def leave(self, frontend_id: str) -> None:
        """A frontend or trainer that closes says so: from now on it is not waited for, nor given a lease,
        unless it watches again."""
        with self._cond:
            self._gone.pop(frontend_id, None)
            if frontend_id in self._watching:  # its stream ends a moment later
                self._left.add(frontend_id)
            self._cond.notify_all()

    def await_acks(self, epoch: int, timeout: float, among: Collection[str] | None = None) -> list[str]:
        """Waits until every frontend that is watching, or whose stream broke less than a lease
        ago, acked `epoch` (and any restart warm-up is over); returns those that had not by `timeout`.
        `among`: only these frontends are waited for."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                now = time.monotonic()
                self._gone = {f: t for f, t in self._gone.items() if now - t < self._lease_s}  # forget the long gone
                recent = list(self._gone)
                lagging = sorted(f for f in {*self._watching, *recent} - self._left if self._acks.get(f, 0) < epoch
                                 and (among is None or f in among))
                remaining = deadline - now
                if (not lagging and now >= self._warm_until) or remaining <= 0 or self._closed:
                    return lagging
                # wake for acks and streams; also when the warm-up or a broken stream's lease runs out
                ends = [t + self._lease_s - now for t in self._gone.values()] + [self._warm_until - now]
                self._cond.wait(min([remaining] + [e for e in ends if e > 0]))

    def watch(self, frontend_id: str, known_epoch: int, alive, trainer: bool = False) -> Iterator[Table]:
        """Yields the table whenever its epoch passes what the frontend has; ends when `alive()` turns false."""
        with self._cond:
            if trainer:
                self._trainers.add(frontend_id)
            self._watching[frontend_id] = self._watching.get(frontend_id, 0) + 1
            self._gone.pop(frontend_id, None)
            self._left.discard(frontend_id)
        try:
            sent = known_epoch
            while alive() and not self._closed:
                with self._cond:
                    if self._table.epoch <= sent:
                        self._cond.wait(0.5)
                    table = self._table
                if table.epoch > sent and table.placement:
                    sent = table.epoch
                    yield table
        finally:
            with self._cond:
                self._watching[frontend_id] -= 1
                if not self._watching[frontend_id]:
                    del self._watching[frontend_id]
                    if frontend_id in self._left:
                        self._left.discard(frontend_id)
                    else:
                        self._gone[frontend_id] = time.monotonic()
                self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
