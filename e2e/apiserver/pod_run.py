"""What the fake kubelet keeps of each pod it runs, and the pod status it reports from that."""

from __future__ import annotations

import datetime
import subprocess
from dataclasses import dataclass, field
from pathlib import Path


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class ContainerRun:
    spec: dict
    log_path: Path
    proc: subprocess.Popen | None = None
    started_once: bool = False
    started_at: str = ""
    restart_count: int = 0
    next_start: float = 0.0
    waiting: tuple[str, str] = ("ContainerCreating", "")
    last_terminated: dict | None = None
    done: bool = False  # exited and will not be restarted
    ready: bool = False


@dataclass
class PodRun:
    uid: str
    namespace: str
    name: str
    ip: str
    pod: dict
    dir: Path
    start_time: str
    containers: dict[str, ContainerRun] = field(default_factory=dict)
    kill_deadline: float | None = None
    finalized: bool = False
    ip_released: bool = False
    transitions: dict[str, tuple[str, str]] = field(default_factory=dict)  # condition -> (status, time)
    last_status: str = ""

    @property
    def ready(self) -> bool:
        return (self.kill_deadline is None and bool(self.containers)
                and all(c.ready for c in self.containers.values()))


def _condition(run: PodRun, kind: str, ok: bool, reason: str = "") -> dict:
    """One pod condition; its lastTransitionTime moves only when its status changes."""
    status = "True" if ok else "False"
    previous = run.transitions.get(kind)
    if previous is None or previous[0] != status:
        run.transitions[kind] = (status, now())
    condition = {"type": kind, "status": status, "lastProbeTime": None,
                 "lastTransitionTime": run.transitions[kind][1]}
    if reason and not ok:
        condition["reason"] = reason
    return condition


def pod_status(run: PodRun, host_ip: str) -> dict:
    """The pod's `status` as a kubelet reports it, from what its containers are doing (records when each
    condition last changed in `run.transitions`)."""
    statuses = []
    for spec in run.pod["spec"].get("containers", []):
        c = run.containers[spec["name"]]
        if c.proc is not None:
            state = {"running": {"startedAt": c.started_at}}
        elif c.done and c.last_terminated:
            state = {"terminated": c.last_terminated}
        else:
            state = {"waiting": {"reason": c.waiting[0] or "ContainerCreating"} | (
                {"message": c.waiting[1]} if c.waiting[1] else {})}
        status = {"name": spec["name"], "image": spec.get("image", ""), "imageID": "", "ready": c.ready,
                  "restartCount": c.restart_count, "started": c.proc is not None, "state": state}
        if c.proc is not None:
            status["containerID"] = f"fake://{c.proc.pid}"
        if c.last_terminated and not c.done:
            status["lastState"] = {"terminated": c.last_terminated}
        statuses.append(status)
    containers = run.containers.values()
    if containers and all(c.done for c in containers):
        phase = "Succeeded" if all(c.last_terminated and c.last_terminated["exitCode"] == 0 for c in containers) \
            else "Failed"
    elif any(c.started_once for c in containers):
        phase = "Running"
    else:
        phase = "Pending"
    ready, reason = run.ready, "PodCompleted" if phase in ("Succeeded", "Failed") else "ContainersNotReady"
    return {
        "phase": phase, "hostIP": host_ip, "hostIPs": [{"ip": host_ip}], "podIP": run.ip, "podIPs": [{"ip": run.ip}],
        "startTime": run.start_time, "containerStatuses": statuses,
        "conditions": [_condition(run, "PodScheduled", True), _condition(run, "Initialized", True),
                       _condition(run, "ContainersReady", ready, reason),
                       _condition(run, "Ready", ready, reason)],
    }


def container_port(port: int | str, containers: list[dict]) -> int | None:
    """A probe's or a Service's target port: a number, or the name of a containerPort."""
    if isinstance(port, int):
        return port
    if port.isdigit():
        return int(port)
    for c in containers:
        for p in c.get("ports") or []:
            if p.get("name") == port:
                return p["containerPort"]
    return None
