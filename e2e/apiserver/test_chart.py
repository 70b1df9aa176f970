"""The Helm chart, rendered by the helm built from source: lint, both RBAC modes, least privilege, restricted pods."""

from __future__ import annotations

import json
import subprocess

from chart_render import CHART, queries, render


def test_lint_strict(kube):
    result = kube.helm("lint", "--strict", str(CHART))
    assert "0 chart(s) failed" in result.stdout


def test_cluster_wide_rbac_is_least_privilege(kube):
    docs = render(kube)
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == ["ClusterRole", "ClusterRoleBinding", "Deployment", "Service", "ServiceAccount"]
    role = next(d for d in docs if d["kind"] == "ClusterRole")
    for rule in role["rules"]:
        assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"], rule
    granted = {(group, res, verb) for rule in role["rules"]
               for group in rule["apiGroups"] for res in rule["resources"] for verb in rule["verbs"]}
    assert ("", "pods", "create") in granted and ("moecluster.io", "moeclusters/status", "patch") in granted
    assert not {x for x in granted if x[1] in ("secrets", "configmaps", "nodes", "pods/exec")}


def test_namespaced_mode_has_nothing_cluster_scoped(kube):
    docs = render(kube, "operator.watchNamespaces={a,b}")
    assert not [d for d in docs if d["kind"].startswith("Cluster")]
    roles = [d for d in docs if d["kind"] == "Role"]
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["a", "b"]
    args = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[-4:] == ["--namespace", "a", "--namespace", "b"]


def test_operator_pod_meets_the_restricted_profile_and_runs_alone(kube):
    deployment = next(d for d in render(kube) if d["kind"] == "Deployment")
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"]["type"] == "Recreate"
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    container = pod["containers"][0]["securityContext"]
    assert container["allowPrivilegeEscalation"] is False and container["capabilities"]["drop"] == ["ALL"]
    assert container["readOnlyRootFilesystem"] is True


def test_optional_parts_render(kube):
    docs = render(kube, "networkPolicy.enabled=true", "serviceMonitor.enabled=true", "example.enabled=true",
                  "prometheusRule.enabled=true", "prometheusRule.p99Seconds=2.5", "dashboard.enabled=true")
    kinds = {d["kind"] for d in docs}
    assert {"NetworkPolicy", "MoECluster", "PrometheusRule", "ConfigMap"} <= kinds and kinds & {"PodMonitor", "ServiceMonitor"}
    monitor = next(d for d in docs if d["kind"] == "PodMonitor")
    assert monitor["spec"]["podTargetLabels"] == ["app.kubernetes.io/instance"]  # the alerts group by the MoECluster
    rules = {r["alert"]: r for r in next(d for d in docs if d["kind"] == "PrometheusRule")["spec"]["groups"][0]["rules"]}
    assert rules["MoEClusterSlowRequests"]["expr"].rstrip().endswith("> 2.5")
    assert "{{ $labels.method }}" in rules["MoEClusterSlowRequests"]["annotations"]["summary"]  # left for Prometheus
    dashboard = next(d for d in docs if d["kind"] == "ConfigMap")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["moecluster.json"])["uid"] == "moecluster"
    refused = kube.helm("template", "moe", str(CHART), "--set", "prometheusRule.errorRatio=2", check=False)
    assert refused.returncode != 0 and "errorRatio" in refused.stderr  # values.schema.json


def test_the_alerts_and_the_dashboard_are_promql_that_prometheus_parses(kube):
    exprs = queries(render(kube, "prometheusRule.enabled=true", "dashboard.enabled=true"))
    assert len(exprs) >= 20 and not [e for e in exprs if "$" in e]
    check = kube.bins["PROMQL_CHECK"]
    result = subprocess.run([check], input=json.dumps(exprs), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    broken = subprocess.run([check], input=json.dumps(["sum by (a (x)"]), capture_output=True, text=True, timeout=60)
    assert broken.returncode == 1 and "parse error" in broken.stdout  # the checker can say no

