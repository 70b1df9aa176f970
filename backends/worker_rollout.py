"""Rolling a MoECluster's worker pods onto a changed template, a few replaces at a time: pure planning.

A worker pod runs what the cluster's worker template said when the pod was made: image, resources, flags
(`k8s_resources.worker_template`). When the template changes (a new image, `worker.computeThreads`), pods
made before are outdated. Kubernetes rolls a Deployment's pods itself; worker pods are the operator's own, so
it rolls them as `kubectl moe replace` would: a new pod on the new template starts and takes the old one's
experts before the old one stops. The pool never holds fewer copies than it had, so no request fails.

`maxSurge` workers at a time (1 by default: each needs room for a new pod first), and only while the
cluster is otherwise at rest (converged, no worker leaving, starting or dead, no request of a user running):
a rollout never stacks on a scale or a recovery, and a new pod that cannot start (a bad image) stalls it
with the old pods serving, until the template is fixed. Spares go first: they hold no experts, and a
replace takes a spare, which must then run the new template.
"""

from __future__ import annotations

from dataclasses import dataclass

ROLLING_UPDATE, ON_DELETE = "RollingUpdate", "OnDelete"
AT_REST = ("serving", "standby")


@dataclass(frozen=True)
class Rollout:
    updated: tuple[str, ...]  # workers whose pod runs the current template
    outdated: tuple[str, ...]  # the others, in the order they are replaced
    updated_replicas: int  # updated workers in the pool (spares not counted, as in status.replicas)
    replace: tuple[str, ...] = ()  # the workers to replace now
    waiting: str = ""  # why none is replaced now while some are outdated

    @property
    def message(self) -> str:
        total = len(self.updated) + len(self.outdated)
        head = f"{len(self.updated)}/{total} workers on the current template"
        if not self.outdated:
            return head
        return f"{head}; " + (f"replacing {', '.join(self.replace)}" if self.replace else self.waiting)


def plan(templates: dict[str, str], template: str, status: dict | None, strategy: str = ROLLING_UPDATE,
         busy: str = "", max_surge: int = 1) -> Rollout:
    """templates: worker id -> the template its pod was made from ("" for a pod made before templates were
    recorded: outdated); template: the current one; status: the controller's `status()` (None: not started);
    busy: a user's request still running ("" if none); max_surge: workers replaced at once."""
    states = {w["id"]: w["state"] for w in (status or {}).get("workers", [])}
    updated = tuple(sorted(w for w, t in templates.items() if t == template))
    # Spares first (nothing to move), then the pool in id order.
    outdated = tuple(sorted((w for w, t in templates.items() if t != template),
                            key=lambda w: (states.get(w) != "standby", w)))
    members = sum(1 for w in updated if states.get(w, "serving") != "standby")
    rollout = Rollout(updated, outdated, members)
    if not outdated:
        return rollout
    waiting = _why_not_now(templates, outdated, status, strategy, busy)
    if waiting:
        return Rollout(updated, outdated, members, waiting=waiting)
    return Rollout(updated, outdated, members, replace=outdated[:max(1, max_surge)])


def _why_not_now(templates: dict[str, str], outdated: tuple[str, ...], status: dict | None, strategy: str,
                 busy: str) -> str:
    if status is None:
        return "waiting for the controller to start"
    leaving = [w["id"] for w in status["workers"] if w["state"] == "leaving" and w["id"] in outdated]
    if leaving:  # a replace under way (this rollout's, or a user's)
        return f"replacing {', '.join(leaving)}"
    if strategy == ON_DELETE:
        return "updateStrategy OnDelete: an outdated worker is replaced once its pod is deleted"
    if busy:
        return f"waiting for {busy}"
    unsettled = sorted(f"{w['id']} {w['state']}" for w in status["workers"] if w["state"] not in AT_REST)
    if unsettled:
        return f"waiting for {', '.join(unsettled)}"
    unknown = sorted(set(templates) - {w["id"] for w in status["workers"]})
    if unknown:
        return f"waiting for {', '.join(unknown)} to join"
    serving = sum(1 for w in status["workers"] if w["state"] == "serving")
    if not status["converged"] or serving != status["desired_workers"]:
        return f"waiting for the pool to settle ({serving}/{status['desired_workers']} workers serving)"
    return ""
