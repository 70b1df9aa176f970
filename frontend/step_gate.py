"""Training steps versus copies of expert state.

The controller copies an expert's training state only between steps (DESIGN.md,
rule 5): it publishes a paused table and waits for every trainer's
acknowledgement. A trainer acknowledges a paused table at once when it is
between steps, else when its step ends; and it starts no step while the table
is paused. So a copy never sees half a step, and training waits at the step
boundary for no longer than the copy takes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class StepGate:
    def __init__(self):
        self._cond = threading.Condition()
        self._paused = False
        self._in_step = False
        self._deferred: Callable[[], None] | None = None
        self.waited_s = 0.0  # time steps spent waiting for a pause to lift, in all

    def on_table(self, paused: bool, ack: Callable[[], None]) -> None:
        """A new table arrived; `ack` acknowledges it (now, or when the step under way ends)."""
        with self._cond:
            self._paused = paused
            if paused and self._in_step:
                self._deferred = ack
                return
            self._deferred = None  # a newer acknowledgement covers the older one
            self._cond.notify_all()
        ack()

    def enter(self, timeout: float, progress: Callable[[str], None] = lambda message: None) -> None:
        """Begins a step (no-op inside one); waits while the table is paused. TimeoutError after `timeout`."""
        with self._cond:
            if self._in_step:
                return
            if self._paused:
                progress("expert state is being copied: waiting to start the step")
            started = time.monotonic()
            lifted = self._cond.wait_for(lambda: not self._paused, timeout)
            self.waited_s += time.monotonic() - started
            if not lifted:
                raise TimeoutError(f"the routing table stayed paused for {timeout:.0f}s: is the controller stuck mid-copy?")
            self._in_step = True

    def leave(self) -> None:
        """Ends the step (no-op outside one); acknowledges a paused table that waited for it."""
        with self._cond:
            self._in_step = False
            ack, self._deferred = self._deferred, None
        if ack is not None:
            ack()

    @property
    def in_step(self) -> bool:
        return self._in_step
