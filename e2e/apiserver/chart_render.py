"""The Helm chart rendered by the helm built from source, and the PromQL its alerts and dashboard hold."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

CHART = Path(__file__).resolve().parents[2] / "helm" / "moecluster"
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$namespace": ".*", "$cluster": ".*"}


def render(kube, *values: str) -> list[dict]:
    """`helm template` of the chart with each `--set` value; its documents."""
    args = [a for v in values for a in ("--set", v)]
    out = kube.helm("template", "moe", str(CHART), "--namespace", "moecluster-system", *args).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def queries(docs: list[dict]) -> list[str]:
    """Every PromQL expression of the rendered alerts and dashboard, Grafana's variables given values."""
    rule = next(d for d in docs if d["kind"] == "PrometheusRule")
    exprs = [r["expr"] for group in rule["spec"]["groups"] for r in group["rules"]]
    exprs += [t["expr"] for panel in dashboard(docs)["panels"] for t in panel["targets"]]
    for variable, value in GRAFANA_VARIABLES.items():
        exprs = [e.replace(variable, value) for e in exprs]
    return exprs


def dashboard(docs: list[dict]) -> dict:
    return json.loads(next(d for d in docs if d["kind"] == "ConfigMap")["data"]["moecluster.json"])
