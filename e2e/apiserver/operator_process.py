"""`moecluster-operator` as a local process, for the API-server tests: it runs with a ServiceAccount's token."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Operator:
    """`moecluster-operator` as a local process with the chart ServiceAccount's credentials."""

    def __init__(self, kubeconfig: Path, log: Path, env: dict[str, str] | None = None):
        """`env`: more environment (e.g. MOECLUSTER_INTERNAL_TLS, as the chart's Deployment sets it)."""
        self.kubeconfig, self.log, self.port, self.proc = kubeconfig, log, free_port(), None
        self.env = dict(env or {})
        self.metrics_port = free_port()
        self.args: tuple[str, ...] = ()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, *args: str) -> None:
        """Starts it; `args` are extra flags (e.g. --namespace NS). A restart reuses the port frontends dial."""
        if args:
            self.args = args
        env = {**os.environ, **self.env, "KUBECONFIG": str(self.kubeconfig)}
        with open(self.log, "a") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "moecluster.backends.k8s_operator", "--controller-host", "127.0.0.1",
                 "--controller-port", str(self.port), "--controller-address", self.address, "--liveness-port", "0",
                 "--metrics-host", "127.0.0.1", "--metrics-port", str(self.metrics_port),
                 "--default-image", "moecluster:test", *self.args], env=env, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()
