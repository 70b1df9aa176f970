"""`moectl`'s side of the Ray backend: connect to Ray, start, find and stop a cluster's controller actor.

The controller runs as a detached actor named `NAME/controller`, pinned to the
node `moectl` runs on (its cluster folder, spec.json, lives there). Everything
after that goes through the controller's gRPC address, as on the local backend.
"""

from __future__ import annotations

import time
from pathlib import Path

import ray
from moecluster.backends.ray_actors import NAMESPACE, PORT_TAKEN, ControllerActor, node_host
from ray.exceptions import GetTimeoutError, RayActorError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

__all__ = ["PortTaken", "connect", "controller_address", "node_host", "start_controller", "stop_controller"]


class PortTaken(RuntimeError):
    """The controller actor's port was bound by another process first (Ray's own processes pick ports too)."""


def connect(address: str) -> None:
    if not ray.is_initialized():
        ray.init(address=address, namespace=NAMESPACE, log_to_driver=False, configure_logging=False)


def _controller(name: str):
    try:
        return ray.get_actor(f"{name}/controller", namespace=NAMESPACE)
    except ValueError:
        return None


def controller_address(name: str, timeout: float = 10.0) -> str | None:
    """The running controller's gRPC address; None when there is none (or it does not answer)."""
    actor = _controller(name)
    if actor is None:
        return None
    try:
        return ray.get(actor.info.remote(), timeout=timeout)[0]
    except (RayActorError, GetTimeoutError):
        return None


def start_controller(cluster_dir: Path, name: str, timeout: float) -> str:
    """Starts the controller actor (replacing a dead one); returns its gRPC address."""
    stop_controller(name)
    here = ray.get_runtime_context().get_node_id()
    deadline = time.monotonic() + 30
    while True:
        try:
            actor = ControllerActor.options(
                name=f"{name}/controller", namespace=NAMESPACE, lifetime="detached", num_cpus=0,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=here, soft=False)).remote(str(cluster_dir))
            break
        except ValueError:  # the name of the actor just killed is not free yet
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    try:
        return ray.get(actor.info.remote(), timeout=timeout)[0]
    except (RayActorError, GetTimeoutError) as err:
        ray.kill(actor)
        if PORT_TAKEN in str(err):
            raise PortTaken(str(err).splitlines()[-1]) from None
        raise


def stop_controller(name: str) -> None:
    actor = _controller(name)
    if actor is not None:
        try:
            ray.get(actor.stop.remote(), timeout=10)
        except (RayActorError, GetTimeoutError):
            pass
        ray.kill(actor)
