"""Requests for the same key that arrive while calls are computed go together as the next call.

A decode step's few tokens still read every weight of the experts they pick, so N
clients decoding at once read those weights N times, one small kernel call each.
Here a few compute threads (2 by default) make every call: a request that finds one
idle is computed at once, alone, so nothing waits for company and a light load gains
no latency. Requests that arrive while every thread computes queue up; the next call
takes the oldest one's key (a worker's MoE layer) and every request queued for that
key, so the busier the worker, the bigger its calls, with no timer to tune (hivemind's
task pools work this way).

Long-lived compute threads, not the request threads taking turns: torch's CPU kernels
keep a pool of OpenMP/MKL threads per calling thread, and calls that hop between callers
ran at half speed here (7.7 -> 14 ms for the same call). Two, not one: while one computes,
the other runs its call's Python and copies (on a GPU: launches behind the first's kernels);
with one, 4 clients on 2 cores got 0.85x the requests/s of no batching, with two 1.10x (bench/batching.py).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

Compute = Callable[[Hashable, Sequence[Any]], Sequence[Any]]  # (key, items) -> one outcome per item


@dataclass(eq=False)
class _Ticket:
    key: Hashable
    item: Any
    rows: int
    done: threading.Event = field(default_factory=threading.Event)
    outcome: Any = None


class RequestBatcher:
    """`run(key, item, rows)` returns `compute(key, items)`'s outcome for `item`, computed on
    one of `threads` compute threads with the requests for `key` queued beside it (up to
    `max_rows` rows a call). A request larger than that is computed at once on the caller's
    thread: it gains little from company, and small requests should not queue behind it. An
    outcome that is an exception is raised to its caller; an exception out of `compute` itself
    is raised to every caller of that call. `close()` stops the threads once the queue is empty."""

    def __init__(self, compute: Compute, max_rows: int, *, threads: int = 2, name: str = "request-batcher"):
        if max_rows < 1:
            raise ValueError(f"max_rows is {max_rows}; a call takes at least 1 row")
        if threads < 1:
            raise ValueError(f"threads is {threads}; calls need at least 1 thread to run on")
        self._compute = compute
        self.max_rows = max_rows
        self._ready = threading.Condition()
        self._queue: deque[_Ticket] = deque()
        self._closed = False
        self.calls = 0  # compute calls made
        self.requests = 0  # requests answered by them
        self._threads = [threading.Thread(target=self._serve, name=f"{name}-{i}", daemon=True) for i in range(threads)]
        for thread in self._threads:
            thread.start()

    def run(self, key: Hashable, item: Any, rows: int) -> Any:
        ticket = _Ticket(key, item, rows)
        if rows > self.max_rows:  # big enough alone: computed now, beside the batcher's calls
            self._call([ticket])
        else:
            with self._ready:
                if self._closed:
                    raise RuntimeError("the request batcher is closed")
                self._queue.append(ticket)
                self._ready.notify()
            ticket.done.wait()
        if isinstance(ticket.outcome, BaseException):
            raise ticket.outcome
        return ticket.outcome

    def queued(self) -> int:
        """Requests waiting for a call (those of the call being computed not counted)."""
        with self._ready:
            return len(self._queue)

    def close(self, timeout: float = 30.0) -> None:
        with self._ready:
            self._closed = True
            self._ready.notify_all()
        for thread in self._threads:
            thread.join(timeout)

    def _serve(self) -> None:
        while True:
            with self._ready:
                while not self._queue and not self._closed:
                    self._ready.wait()
                if not self._queue:
                    return
                batch = self._take()
            self._call(batch)
            for ticket in batch:
                ticket.done.set()

    def _take(self) -> list[_Ticket]:
        """The oldest request and those queued for its key after it, up to max_rows rows."""
        first = self._queue.popleft()
        batch, rows, rest, full = [first], first.rows, deque(), False
        while self._queue:
            ticket = self._queue.popleft()
            full = full or (ticket.key == first.key and rows + ticket.rows > self.max_rows)
            if ticket.key == first.key and not full:  # in arrival order: none overtakes one left for the next call
                batch.append(ticket)
                rows += ticket.rows
            else:
                rest.append(ticket)
        self._queue = rest
        return batch

    def _call(self, batch: list[_Ticket]) -> None:
        try:
            outcomes = list(self._compute(batch[0].key, [t.item for t in batch]))
            if len(outcomes) != len(batch):
                raise RuntimeError(f"compute answered {len(outcomes)} of {len(batch)} requests")
        except BaseException as err:  # noqa: BLE001 - every waiting caller must hear of it
            outcomes = [err] * len(batch)
        for ticket, outcome in zip(batch, outcomes):
            ticket.outcome = outcome
        with self._ready:
            self.calls += 1
            self.requests += len(batch)
