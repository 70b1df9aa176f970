"""kubectl-moe: the kubectl plugin for MoECluster resources (verb, then noun).

    kubectl moe status  NAME                          what the operator observes: workers, experts, conditions
    kubectl moe scale   NAME --replicas N             the same as `kubectl scale moecluster/NAME`, then waits
    kubectl moe drain   NAME WORKER                   move WORKER's experts away and remove it (pool shrinks by one)
    kubectl moe replace NAME WORKER                   a new worker takes WORKER's experts first (pool keeps its size)
    kubectl moe migrate NAME LAYER:EXPERT --to WORKER copy one expert to WORKER, then switch traffic to it
    kubectl moe snapshot NAME                     every expert's training state, at a step boundary (spec.snapshots)
    kubectl moe snapshots NAME                    what a restore or a trainer's resume can use, the newest first
    kubectl moe restore NAME [SNAPSHOT]           roll every expert back to SNAPSHOT (default: the newest good one)
    kubectl moe rollout NAME                      wait until every worker runs the current template

Everything goes through the API server with your kubectl (its context, its
credentials): scale patches the scale subresource; drain, replace, migrate,
snapshot and restore set an annotation the operator takes once and reports in `status.lastAction`. Put
this on PATH as `kubectl-moe` (pip installs it) and kubectl finds it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import uuid

from moecluster.backends.k8s_resources import (
    DRAIN_ANNOTATION,
    MIGRATE_ANNOTATION,
    REPLACE_ANNOTATION,
    REQUEST_ANNOTATION,
    RESTORE_ANNOTATION,
    SNAPSHOT_ANNOTATION,
    parse_migrate,
)
from moecluster.cli.snapshot_table import describe
from moecluster.controller.progress import SAY_WAITING_AFTER_S


class KubectlError(RuntimeError):
    pass


class Kubectl:
    def __init__(self, namespace: str | None, context: str | None, kubeconfig: str | None):
        self.base = [os.environ.get("KUBECTL", "kubectl")]
        for flag, value in (("--namespace", namespace), ("--context", context), ("--kubeconfig", kubeconfig)):
            if value:
                self.base += [flag, value]

    def __call__(self, *args: str) -> str:
        try:
            done = subprocess.run([*self.base, *args], capture_output=True, text=True, timeout=60)
        except FileNotFoundError:
            raise KubectlError(f"{self.base[0]}: not found; install kubectl or set KUBECTL") from None
        if done.returncode != 0:
            raise KubectlError(done.stderr.strip() or f"kubectl {' '.join(args)} failed")
        return done.stdout

    def get(self, name: str) -> dict:
        return json.loads(self("get", f"moecluster/{name}", "-o", "json"))


def format_status(obj: dict) -> str:
    """A few lines a person reads: sizes, conditions, workers, the last drain or migrate."""
    meta, spec, status = obj["metadata"], obj.get("spec", {}), obj.get("status", {})
    lines = [f"{meta.get('namespace', '')}/{meta['name']}: {status.get('readyReplicas', 0)}/{spec.get('replicas')} workers "
             f"ready, epoch {status.get('epoch', 0)}, {spec.get('minReplicasPerExpert', 1)} copies per expert",
             f"  endpoint:  {status.get('endpoint', 'unknown')}",
             f"  placement: {status.get('placement', 'unknown')}"]
    for c in status.get("conditions", []):
        detail = f" ({c['message']})" if c.get("message") else ""
        lines.append(f"  {c['type']:<9} {c['status']:<5} {c.get('reason', '')}{detail}")
    workers = status.get("workers", [])
    if workers:
        lines.append(f"  {'WORKER':<12} {'POD':<32} {'STATE':<10} {'EXPERTS':<8} {'DEVICE':<8} UP-TO-DATE")
        lines += [f"  {w['id']:<12} {w.get('pod', ''):<32} {w.get('state', ''):<10} {w.get('experts', 0):<8} "
                  f"{w.get('device') or '?':<8} {_yes_no(w.get('updated'))}" for w in workers]
    training = status.get("training") or {}
    if training.get("step") or training.get("lastSnapshot"):
        lines.append(f"  training:  step {training.get('step', 0)}"
                     + (f", last snapshot {training['lastSnapshot']}" if training.get("lastSnapshot") else "")
                     + (f", restored {training['restored']}" if training.get("restored") else ""))
    if training.get("lowestStep", training.get("step", 0)) < training.get("step", 0) and not training.get("trainers"):
        lines.append(f"  experts at steps {training['lowestStep']}..{training['step']}: an update was cut off (its "
                     f"trainer stopped mid-way); resume the trainer from a snapshot, or `kubectl moe restore`")
    action = status.get("lastAction")
    if action:
        lines.append(f"  last action: {action['action']}: {action['state']} {action.get('message', '')}".rstrip())
    return "\n".join(lines)


def _yes_no(flag: bool | None) -> str:
    return "?" if flag is None else "yes" if flag else "no"


def format_snapshots(obj: dict) -> str:
    found = (obj.get("status", {}).get("training") or {}).get("snapshots") or []
    if not found:
        volume = "spec.snapshots" if obj.get("spec", {}).get("snapshots") else "no spec.snapshots: no volume"
        return f"no snapshots ({volume})"
    return "\n".join(describe(x["step"], x["experts"], x["bytes"], x["trainerState"], x["path"]) for x in found)


def _ready(obj: dict, replicas: int) -> bool:
    status = obj.get("status", {})
    ready = next((c for c in status.get("conditions", []) if c["type"] == "Ready"), {})
    return (ready.get("status") == "True" and status.get("readyReplicas") == replicas
            and status.get("observedGeneration", 0) >= obj["metadata"].get("generation", 0))


def _poll(kubectl: Kubectl, name: str, timeout: float, look, failure: str) -> dict:
    """Reads the resource every second until `look(obj, waited_long)` says (True, the last line); prints each new
    line it gives on the way (after SAY_WAITING_AFTER_S, `waited_long`: a long wait says what it waits for)."""
    begin, last = time.monotonic(), ""
    while True:
        obj = kubectl.get(name)
        done, line = look(obj, time.monotonic() - begin >= SAY_WAITING_AFTER_S)
        if done:
            print(line)
            return obj
        if line != last:
            print(line, flush=True)
            last = line
        if time.monotonic() - begin > timeout:
            raise TimeoutError(f"{failure} within {timeout:.0f}s; see `kubectl moe status {name}` and "
                               f"`kubectl describe moecluster/{name}`")
        time.sleep(1.0)


def _degraded(status: dict) -> str:
    degraded = next((c for c in status.get("conditions", []) if c["type"] == "Degraded"), {})
    return f"; {degraded['message']}" if degraded.get("status") == "True" and degraded.get("message") else ""


def wait_ready(kubectl: Kubectl, name: str, replicas: int, timeout: float) -> dict:
    def look(obj: dict, waited_long: bool) -> tuple[bool, str]:
        status = obj.get("status", {})
        if _ready(obj, replicas):
            return True, f"done: {replicas} workers serving at epoch {status.get('epoch', 0)}"
        line = f"{status.get('readyReplicas', 0)}/{replicas} workers serving, epoch {status.get('epoch', 0)}"
        if waited_long:
            starting = [w["id"] for w in status.get("workers", []) if w.get("state") == "starting"]
            line += (f"; waiting for {', '.join(starting)} to start" if starting else "") + _degraded(status)
        return False, line

    return _poll(kubectl, name, timeout, look, f"{name} did not reach {replicas} ready workers")


def wait_rollout(kubectl: Kubectl, name: str, timeout: float) -> dict:
    """Waits until every worker runs the current template (the Updating condition False) and the pool is Ready."""
    def look(obj: dict, waited_long: bool) -> tuple[bool, str]:
        status = obj.get("status", {})
        conditions = {c["type"]: c for c in status.get("conditions", [])}
        updating = conditions.get("Updating", {})
        current = status.get("observedGeneration", 0) >= obj["metadata"].get("generation", 0)
        if current and updating.get("status") == "False" and conditions.get("Ready", {}).get("status") == "True":
            return True, f"done: {updating.get('message', 'every worker on the current template')}"
        line = (updating.get("message") if current else "") or "waiting for the operator to see the change"
        return False, line + (_degraded(status) if waited_long else "")  # e.g. the new image does not start

    return _poll(kubectl, name, timeout, look, f"the workers of {name} did not all reach the current template")


def ask(kubectl: Kubectl, name: str, annotation: str, value: str) -> str:
    """Sets a request's annotation, with a new request id beside it in the same write; returns the id."""
    request = uuid.uuid4().hex[:12]
    kubectl("annotate", f"moecluster/{name}", f"{annotation}={value}", f"{REQUEST_ANNOTATION}={request}", "--overwrite")
    return request


def wait_action(kubectl: Kubectl, name: str, action: str, request: str, timeout: float) -> dict:
    """Waits for status.lastAction of this request (not an earlier one of the same name) to end."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        last = kubectl.get(name).get("status", {}).get("lastAction") or {}
        if last.get("action") == action and last.get("request") == request and last.get("state") != "Running":
            if last["state"] != "Succeeded":
                raise RuntimeError(f"{action}: {last.get('message', 'failed')}")
            print(f"{action}: {last.get('message', 'done')}")
            return last
        time.sleep(1.0)
    raise TimeoutError(f"{action} did not finish within {timeout:.0f}s; see `kubectl moe status {name}`")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 1))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="kubectl moe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", "--namespace")
    parser.add_argument("--context")
    parser.add_argument("--kubeconfig")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    status = verbs.add_parser("status", help="what the operator observes")
    status.add_argument("name")
    status.add_argument("-o", "--output", choices=["text", "json"], default="text")
    scale = verbs.add_parser("scale", help="set the number of expert workers and wait until they serve")
    scale.add_argument("name")
    scale.add_argument("--replicas", type=int, required=True)
    drain = verbs.add_parser("drain", help="move a worker's experts away and remove it")
    drain.add_argument("name")
    drain.add_argument("worker", help="worker id, e.g. worker-2 (see `kubectl moe status`)")
    replace = verbs.add_parser("replace", help="start a new worker, move a worker's experts to it, then remove the "
                               "old one (the pool keeps its size; while no new pod can start, the old one serves)")
    replace.add_argument("name")
    replace.add_argument("worker", help="worker id, e.g. worker-2 (see `kubectl moe status`)")
    migrate = verbs.add_parser("migrate", help="copy one expert to a worker, then switch traffic to it")
    migrate.add_argument("name")
    migrate.add_argument("expert", help="LAYER:EXPERT, e.g. 0:3")
    migrate.add_argument("--to", required=True, help="the worker id that receives it")
    snapshot = verbs.add_parser("snapshot", help="write every expert's training state to the cluster's snapshot volume")
    snapshot.add_argument("name")
    snapshots = verbs.add_parser("snapshots", help="the snapshots on the cluster's volume, the newest first (as a "
                                 "worker listed them a few seconds ago)")
    snapshots.add_argument("name")
    restore = verbs.add_parser("restore", help="roll every expert back to a snapshot (refused while a trainer is connected)")
    restore.add_argument("name")
    restore.add_argument("snapshot", nargs="?", default="latest",
                         help="a step-NNNNNNNN folder as the workers see it (default: the newest good one)")
    rollout = verbs.add_parser("rollout", help="wait until every worker runs the current template (after a change of "
                               "image or worker section, the operator replaces outdated workers one at a time)")
    rollout.add_argument("name")
    rollout.add_argument("--timeout", type=float, default=1800.0, help="seconds to wait (default 1800)")
    for sub in (scale, drain, replace, migrate, snapshot, restore):
        sub.add_argument("--timeout", type=float, default=600.0, help="seconds to wait (default 600)")
        sub.add_argument("--no-wait", action="store_true", help="return once the request is made")
    args = parser.parse_args(argv)
    kubectl = Kubectl(args.namespace, args.context, args.kubeconfig)
    try:
        if args.verb == "status":
            obj = kubectl.get(args.name)
            print(json.dumps(obj.get("status", {}), indent=2) if args.output == "json" else format_status(obj))
        elif args.verb == "rollout":
            wait_rollout(kubectl, args.name, args.timeout)
        elif args.verb == "snapshots":
            print(format_snapshots(kubectl.get(args.name)))
        elif args.verb == "scale":
            if args.replicas < 1:
                parser.error("--replicas must be at least 1")
            kubectl("scale", f"moecluster/{args.name}", f"--replicas={args.replicas}")
            print(f"scaling {args.name} to {args.replicas} workers", flush=True)
            if not args.no_wait:
                wait_ready(kubectl, args.name, args.replicas, args.timeout)
        elif args.verb in ("drain", "replace"):
            annotation = DRAIN_ANNOTATION if args.verb == "drain" else REPLACE_ANNOTATION
            request = ask(kubectl, args.name, annotation, args.worker)
            print(f"{'draining' if args.verb == 'drain' else 'replacing'} {args.worker}", flush=True)
            if not args.no_wait:
                wait_action(kubectl, args.name, f"{args.verb} {args.worker}", request, args.timeout)
        elif args.verb in ("snapshot", "restore"):
            annotation, action = ((SNAPSHOT_ANNOTATION, "snapshot") if args.verb == "snapshot"
                                  else (RESTORE_ANNOTATION, f"restore {args.snapshot}"))
            request = ask(kubectl, args.name, annotation, args.snapshot if args.verb == "restore" else _now())
            print(f"{action}: asked", flush=True)
            if not args.no_wait:
                wait_action(kubectl, args.name, action, request, args.timeout)
        else:
            value = f"{args.expert}={args.to}"
            parse_migrate(value)  # a bad argument fails here, not in the operator
            request = ask(kubectl, args.name, MIGRATE_ANNOTATION, value)
            print(f"moving expert {args.expert} to {args.to}", flush=True)
            if not args.no_wait:
                wait_action(kubectl, args.name, f"migrate {value}", request, args.timeout)
    except (KubectlError, TimeoutError, RuntimeError, ValueError) as err:
        sys.exit(f"kubectl moe {args.verb}: {err}")


if __name__ == "__main__":
    main()
