"""Rolling worker pods onto a changed template: the template's hash, the pure plan, the status and `kubectl moe`.
The operator carrying it out against a real API server is in e2e/apiserver/test_operator.py."""

from __future__ import annotations

import pytest
from moecluster.backends import k8s_resources as r
from moecluster.backends.worker_rollout import ON_DELETE, plan
from moecluster.cli import kubectl_moe

SPEC = {"model": {"path": "/models/tiny"}, "replicas": 3, "minReplicasPerExpert": 2, "image": "moecluster:1",
        "worker": {"threads": 1}}


def resource(**spec) -> r.Resource:
    return r.Resource("ml", "mixtral", "uid-1", {**SPEC, **spec}, generation=4)


def template(**spec) -> str:
    return r.worker_template(resource(**spec), default_image="unused")


def test_a_pod_carries_its_template_which_is_the_same_for_every_worker():
    pods = [r.worker_pod(resource(), w, default_image="unused") for w in ("worker-0", "worker-7")]
    hashes = {pod["metadata"]["annotations"][r.TEMPLATE_ANNOTATION] for pod in pods}
    assert hashes == {template()} and len(template()) == 16


@pytest.mark.parametrize("change", [
    {"image": "moecluster:2"}, {"imagePullPolicy": "Always"},
    {"worker": {"threads": 1, "computeThreads": 4}}, {"worker": {"threads": 1, "batchTokens": 0}},
    {"worker": {"threads": 2}}, {"worker": {"threads": 1, "dtype": "bfloat16"}},
    {"worker": {"threads": 1, "resources": {"limits": {"nvidia.com/gpu": 1}}}},
    {"worker": {"threads": 1, "nodeSelector": {"pool": "h100"}}},
    {"snapshots": {"volume": {"persistentVolumeClaim": {"claimName": "snaps"}}}},
])
def test_what_a_worker_runs_changes_the_template(change):
    assert template(**change) != template()


@pytest.mark.parametrize("change", [
    {"replicas": 5}, {"standbyWorkers": 1}, {"minReplicasPerExpert": 3}, {"rebalanceAbove": 100},
    {"drained": ["worker-0"]}, {"colocate": True}, {"updateStrategy": {"type": ON_DELETE}},
    {"frontend": {"replicas": 3, "generateCacheTokens": 64, "forwardBatchTokens": 0, "resources": {"limits": {"cpu": 4}},
                  "apiKeys": {"secretName": "keys"}, "tls": {"secretName": "cert"}}},
])
def test_what_only_the_controller_or_the_frontends_read_does_not(change):
    assert template(**change) == template()  # no worker is replaced for a scale or a frontend's setting


def workers(*states: str, converged: bool = True, desired: int | None = None) -> dict:
    """A controller `status()`: worker-i in states[i]."""
    listed = [{"id": f"worker-{i}", "state": s} for i, s in enumerate(states)]
    return {"workers": listed, "converged": converged,
            "desired_workers": sum(s in ("serving", "leaving") for s in states) if desired is None else desired}


def test_outdated_workers_are_replaced_spares_first_then_in_id_order():
    templates = {"worker-0": "old", "worker-1": "new", "worker-2": "", "worker-3": "old"}
    status = workers("serving", "serving", "serving", "standby")
    rollout = plan(templates, "new", status)
    assert rollout.outdated == ("worker-3", "worker-0", "worker-2")  # "": a pod from before templates were kept
    assert (rollout.replace, rollout.updated, rollout.updated_replicas) == (("worker-3",), ("worker-1",), 1)
    assert rollout.message == "1/4 workers on the current template; replacing worker-3"
    done = plan(dict.fromkeys(templates, "new"), "new", status)
    assert (done.replace, done.outdated, done.updated_replicas) == ((), (), 3)  # the spare is not a replica
    assert done.message == "4/4 workers on the current template"
    surge = plan(templates, "new", status, max_surge=2)  # room for two new pods: two go at once
    assert surge.replace == ("worker-3", "worker-0") and surge.message.endswith("replacing worker-3, worker-0")
    assert plan(templates, "new", status, max_surge=9).replace == rollout.outdated


@pytest.mark.parametrize(("status", "busy", "strategy", "why"), [
    (workers("serving", "leaving", "serving"), "", "RollingUpdate", "waiting for worker-1 leaving"),
    (workers("leaving", "serving", "serving", "starting"), "", "RollingUpdate", "replacing worker-0"),  # under way
    (workers("serving", "serving", "starting"), "", "RollingUpdate", "waiting for worker-2 starting"),
    (workers("serving", "serving", "dead"), "", "RollingUpdate", "waiting for worker-2 dead"),
    (workers("serving", "serving"), "", "RollingUpdate", "waiting for worker-2 to join"),
    (workers("serving", "serving", "serving", converged=False), "", "RollingUpdate",
     "waiting for the pool to settle (3/3 workers serving)"),
    (workers("serving", "serving", "serving", desired=4), "", "RollingUpdate",
     "waiting for the pool to settle (3/4 workers serving)"),
    (workers("serving", "serving", "serving"), "migrate 0:1=worker-2", "RollingUpdate",
     "waiting for migrate 0:1=worker-2"),
    (None, "", "RollingUpdate", "waiting for the controller to start"),
    (workers("serving", "serving", "serving"), "", ON_DELETE,
     "updateStrategy OnDelete: an outdated worker is replaced once its pod is deleted"),
])
def test_nothing_is_replaced_unless_the_cluster_is_at_rest(status, busy, strategy, why):
    templates = {"worker-0": "old", "worker-1": "new", "worker-2": "new"}
    rollout = plan(templates, "new", status, strategy, busy)
    assert (rollout.replace, rollout.outdated, rollout.waiting) == ((), ("worker-0",), why)
    assert rollout.message == f"2/3 workers on the current template; {why}"
    assert plan(templates, "new", workers("serving", "serving", "serving")).replace == ("worker-0",)  # at rest: it goes


def test_status_counts_updated_workers_and_says_what_the_rollout_does():
    status = {"workers": [{"id": f"worker-{i}", "address": "", "pid": 0, "state": "serving", "experts": [[0, i]],
                           "load": 0, "device": "cpu"} for i in range(3)],
              "dead": [], "desired_workers": 3, "converged": True, "last_error": "", "epoch": 9, "imbalance": 1.0,
              "step": 0, "lowest_step": 0, "trainers": [], "snapshot": "", "restored": "", "rollbacks": [],
              "snapshots": []}
    rolling = plan({"worker-0": "new", "worker-1": "old", "worker-2": "old"}, "new", status)
    patch = r.status_patch(resource(), status, 3, {}, "t0", rollout=rolling)
    assert patch["updatedReplicas"] == 1 and [w["updated"] for w in patch["workers"]] == [True, False, False]
    updating = {c["type"]: c for c in patch["conditions"]}["Updating"]
    assert (updating["status"], updating["reason"]) == ("True", "Outdated")
    assert updating["message"] == "1/3 workers on the current template; replacing worker-1"
    done = r.status_patch(resource(), status, 3, patch, "t1", rollout=plan(dict.fromkeys(("worker-0", "worker-1",
                                                                                            "worker-2"), "new"), "new", status))
    updating = {c["type"]: c for c in done["conditions"]}["Updating"]
    assert (done["updatedReplicas"], updating["status"], updating["reason"], updating["lastTransitionTime"]) == (
        3, "False", "UpToDate", "t1")
    obj = {"metadata": {"namespace": "ml", "name": "mixtral"}, "spec": {"replicas": 3}, "status": patch}
    rows = [line.split() for line in kubectl_moe.format_status(obj).splitlines() if line.strip().startswith("worker-")]
    assert [row[-1] for row in rows] == ["yes", "no", "no"]


def test_kubectl_moe_rollout_waits_for_the_last_outdated_worker(monkeypatch, capsys):
    def obj(message: str, outdated: bool, generation: int = 5) -> dict:
        updating = {"type": "Updating", "status": str(outdated), "message": message}
        return {"metadata": {"generation": 5}, "status": {"observedGeneration": generation, "conditions": [
            {"type": "Ready", "status": "True"}, updating,
            {"type": "Degraded", "status": "True", "message": "start/worker-4: ImagePullBackOff"}]}}

    objects = iter([obj("3/3 workers on the current template", False, generation=4),  # before the operator saw it
                    obj("0/3 workers on the current template; replacing worker-0", True),
                    obj("2/3 workers on the current template; replacing worker-2", True),
                    obj("3/3 workers on the current template", False)])

    class Cluster:  # stands where the kube-apiserver would: the resource as the operator wrote it
        def get(self, name):
            return next(objects)

    monkeypatch.setattr(kubectl_moe, "SAY_WAITING_AFTER_S", 0.0)
    monkeypatch.setattr(kubectl_moe.time, "sleep", lambda s: None)
    kubectl_moe.wait_rollout(Cluster(), "mixtral", timeout=60)
    assert capsys.readouterr().out.splitlines() == [
        "waiting for the operator to see the change; start/worker-4: ImagePullBackOff",
        "0/3 workers on the current template; replacing worker-0; start/worker-4: ImagePullBackOff",
        "2/3 workers on the current template; replacing worker-2; start/worker-4: ImagePullBackOff",
        "done: 3/3 workers on the current template"]


def test_an_operator_tick_with_an_older_body_does_not_take_the_spec_back():
    """kopf runs the status timer beside the change handler: a tick's body can predate a change the handler took.
    The runner keeps the newer spec, so the rollout never weighs a new template against an old strategy, and a pod
    started meanwhile gets the new template (a race seen in the e2e test under load)."""
    from moecluster.backends.k8s_operator import ClusterRunner

    changed = r.Resource("ml", "mixtral", "uid-1", {**SPEC, "updateStrategy": {"type": ON_DELETE},
                                                    "worker": {"threads": 2}}, generation=5)
    runner = ClusterRunner(resource())  # generation 4; its controller not started: nothing but the resource kept
    assert runner.sync(changed) is changed
    assert runner.sync(resource()) is changed  # the tick's older body
    assert runner.resource is runner.actuator.resource is changed
    assert runner.actuator.worker_template() == r.worker_template(changed, runner.actuator.default_image)
    newer = r.Resource("ml", "mixtral", "uid-1", SPEC, generation=6)
    assert runner.sync(newer) is newer and runner.actuator.resource is newer
