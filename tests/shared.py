"""What test modules import by name (not from `conftest`: pytest swaps the `conftest` module per folder,
so `from conftest import X` would find e2e/apiserver's when both folders are collected)."""

from __future__ import annotations

import contextlib
import time

FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3"]


@contextlib.contextmanager
def running_workers(checkpoint, placement: dict[tuple[int, int], tuple[str, ...]], devices: dict[str, str] | None = None):
    """Starts one in-process WorkerServer (real gRPC on 127.0.0.1) per worker id in `placement`
    (on `devices[id]`, default the CPU)."""
    from moecluster.workers.server import WorkerServer

    ids = sorted({w for holders in placement.values() for w in holders})
    servers = {}
    try:
        for worker_id in ids:
            keys = [k for k, holders in placement.items() if worker_id in holders]
            device = (devices or {}).get(worker_id, "cpu")
            servers[worker_id] = WorkerServer(checkpoint, keys, worker_id=worker_id, device=device).start()
        yield servers
    finally:
        for server in servers.values():
            server.stop(0)


def wait_for(condition, timeout: float = 5.0, every: float = 0.02) -> bool:
    """True once `condition()` holds; False after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(every)
    return False
