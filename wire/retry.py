"""Streaming admin calls (Scale, Drain, Migrate, Snapshot, Restore) that outlive a controller restart.

A supervised controller that dies mid-call is back at the same address within seconds (its
supervisor, or Ray's actor restart, starts it again). Every such call is safe to ask again:
- Scale sets a target;
- Drain names its worker in the spec: asked again, it waits for that drain;
- Migrate, asked again, does what is left of the move (nothing, once it is done);
- Snapshot writes the pool's state at its step boundary again (a folder cut off is never read);
- Restore again finishes a restore that was cut off.
So on UNAVAILABLE the call is opened again, pausing 50 ms doubling to 1 s, for at most `window_s`
of outage; the caller sees one stream of progress, and the error only if the controller stays away.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import grpc

FIRST_PAUSE_S, MAX_PAUSE_S = 0.05, 1.0
CONTROLLER_BACK_S = 30.0  # a supervisor restarts a dead controller within 11 s (backoff at most 10 s + start-up)


def asking_again(err: grpc.RpcError) -> str:
    """The progress line that says why a stream pauses."""
    return (f"the controller stopped answering ({err.code().name}); asking again once it is back "
            f"(up to {CONTROLLER_BACK_S:.0f}s)")


def stream_again_on_unavailable(open_stream: Callable[[float], Iterator], *, timeout: float,
                                window_s: float = CONTROLLER_BACK_S,
                                on_retry: Callable[[grpc.RpcError], object] = lambda err: None) -> Iterator:
    """Yields what `open_stream(seconds_left)` yields, opening it again on UNAVAILABLE until `window_s` of
    outage or `timeout` in all have passed; then the last RpcError is raised. `on_retry` hears each outage
    once; what it returns, unless None, is yielded (a progress line saying why the stream pauses)."""
    deadline = time.monotonic() + timeout
    outage_since, pause = None, FIRST_PAUSE_S
    while True:
        try:
            for item in open_stream(max(deadline - time.monotonic(), 0.001)):
                outage_since, pause = None, FIRST_PAUSE_S
                yield item
            return
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.UNAVAILABLE:
                raise
            now = time.monotonic()
            first = outage_since is None
            outage_since = now if first else outage_since
            if now + pause - outage_since > window_s or now + pause > deadline:
                raise
            if first and (note := on_retry(err)) is not None:
                yield note
            time.sleep(pause)
            pause = min(pause * 2, MAX_PAUSE_S)
