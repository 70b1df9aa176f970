"""The handshake between a launcher and the servers it starts: a ready file, then a stop signal.

A server writes {"address", "pid", ...} to its --ready-file once it serves
(atomically: the launcher never reads half a file), then runs until SIGTERM or
SIGINT. `backends/processes.spawn` is the other side.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path


def announce_ready(path: Path | None, address: str, **extra) -> None:
    if path is None:
        return
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"address": address, "pid": os.getpid(), **extra}))
    tmp.replace(path)


def stop_signal() -> threading.Event:
    """An event set by SIGTERM or SIGINT (installed now, in the main thread)."""
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    signal.signal(signal.SIGINT, lambda *_: stopped.set())
    return stopped
