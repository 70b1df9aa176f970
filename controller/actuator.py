"""The seam between the controller core and a backend (local processes, Ray, Kubernetes).

The core decides; an actuator only starts and stops things and says what it
started. It is the one place with side effects on processes, so unit tests of
the logic above it may swap it for a fake.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class WorkerHandle:
    id: str
    address: str  # host:port of its gRPC server
    pid: int  # 0 where the backend has no local pid


class Actuator(Protocol):
    def start_worker(self, worker_id: str, timeout: float) -> WorkerHandle:
        """Starts a worker holding no experts; returns once it serves. Idempotent per id."""

    def stop_worker(self, worker_id: str) -> None:
        """Stops it (gracefully if it answers, by force otherwise) and forgets it. Idempotent."""

    def workers(self) -> list[WorkerHandle]:
        """Every worker this backend started and has not stopped: what a restarted controller starts from."""

    def start_frontend(self, controller_address: str, timeout: float) -> WorkerHandle:
        """Starts the frontend, routing by this controller's table; idempotent."""

    def frontend_alive(self) -> bool:
        """False once the frontend it started is gone and nothing else restarts it (the controller then does)."""

    def stop_all(self) -> None:
        """Stops the frontend and every worker."""
