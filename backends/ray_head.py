"""A single-machine Ray instance for `moectl up --backend ray` without --address.

    python -m moecluster.backends.ray_head --ready-file F [--num-cpus N]

Runs `ray start --head --block` on 127.0.0.1 as its child and announces the
head's address (host:port of the GCS) once a driver can connect. SIGTERM stops
it, and `ray start --block` takes every Ray process it started down with it, so
one recorded pid is all `moectl down` needs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from moecluster.wire.ready import announce_ready, stop_signal


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ready-file", type=Path)
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args(argv)
    ray = shutil.which("ray", path=os.path.dirname(sys.executable)) or shutil.which("ray")
    if ray is None:
        sys.exit("ray_head: the `ray` command is missing; pip install 'moecluster[ray]'")
    port = free_port()
    stopped = stop_signal()
    child = subprocess.Popen([ray, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(port),
                              "--num-cpus", str(args.num_cpus), "--include-dashboard", "false",
                              "--disable-usage-stats"], start_new_session=True)
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + args.timeout
    while not _reachable(address):
        if child.poll() is not None or time.monotonic() > deadline or stopped.is_set():
            _stop(child)
            sys.exit(f"ray_head: `ray start --head` did not come up on {address}")
        time.sleep(0.2)
    announce_ready(args.ready_file, address)
    while not stopped.is_set() and child.poll() is None:
        stopped.wait(0.5)
    _stop(child)


def _reachable(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=0.5):
            return True
    except OSError:
        return False


def _stop(child: subprocess.Popen) -> None:
    """SIGTERM to `ray start --block`, which stops the Ray processes it started; SIGKILL their group after."""
    if child.poll() is None:
        child.send_signal(signal.SIGTERM)
        try:
            child.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait(5)


if __name__ == "__main__":
    main()
